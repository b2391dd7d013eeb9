//! The process's metrics registry and its encoding. Observability knows no domain:
//! each crate declares its own metric set once, with [`metric_set!`](crate::metric_set)
//! (or a [`MetricSet`] of its own for scrape-time state), and registers it, together
//! with any scrape-time collector, through [`Metrics::set`]. The autoscaling
//! manifests, alert rules and dashboards name these series, so the names are API;
//! [`Metrics::declared_series`] is what they are checked against.
//!
//! Histograms are the source of truth for latency. Values that exist only at scrape
//! time (queue gauges, drift scores, windowed quantiles, process figures) come from
//! collectors the owning crate registers.

use std::{
    any::{Any, TypeId},
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    sync::Arc,
};

use parking_lot::Mutex;
use prometheus_client::{
    collector::Collector,
    encoding::EncodeLabelSet,
    metrics::{
        exemplar::HistogramWithExemplars,
        family::Family,
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::{Metric, Registry},
};

/// Content type of the OpenMetrics exposition (what Prometheus negotiates; it carries
/// exemplars).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text format, for every other reader.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

// === Shared labels and buckets ===

/// An outcome label: `ok`, a gRPC code name, or a domain's own word.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, or the gRPC code name of the failure (`cancelled`, `deadline_exceeded`, ...).
    pub outcome: &'static str,
}

/// Exemplar label: the trace that produced an observation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabel {
    pub trace_id: String,
}

pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
pub type ExemplarHistogramFamily<L> =
    Family<L, HistogramWithExemplars<TraceLabel>, fn() -> HistogramWithExemplars<TraceLabel>>;

/// Bucket layouts the metric sets share, so a latency is bucketed alike everywhere.
pub mod buckets {
    use super::*;

    /// 100 µs .. ~13 s, doubling: covers the compute-light model and slow batches.
    pub fn latency() -> Histogram {
        Histogram::new(exponential_buckets(0.0001, 2.0, 18))
    }

    pub fn latency_with_exemplars() -> HistogramWithExemplars<TraceLabel> {
        HistogramWithExemplars::new(exponential_buckets(0.0001, 2.0, 18))
    }

    pub fn batch() -> Histogram {
        Histogram::new(exponential_buckets(1.0, 2.0, 8))
    }

    pub fn probability() -> Histogram {
        Histogram::new((1..=10).map(|i| f64::from(i) / 10.0))
    }

    /// Nats; ln(214) ~ 5.4 is Magika's maximum.
    pub fn entropy() -> Histogram {
        Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    }

    /// 10 ms .. ~80 s: model cold starts.
    pub fn load() -> Histogram {
        Histogram::new(exponential_buckets(0.01, 2.0, 14))
    }
}

// === MetricSet ===

/// One crate's metrics, registered once per [`Metrics`] by [`Metrics::set`].
pub trait MetricSet: Send + Sync + 'static {
    /// Makes the set's families and collectors and registers them.
    fn register(r: &mut Registrar<'_>) -> Self;
}

/// Text appended to the exposition at scrape time, for a type the client library
/// does not have (a summary).
pub type TextCollector = Box<dyn Fn(&mut String) + Send + Sync>;

/// What a [`MetricSet`] registers into.
pub struct Registrar<'a> {
    registry: &'a mut Registry,
    declared: &'a mut BTreeSet<String>,
    texts: &'a mut Vec<TextCollector>,
    enabled: bool,
}

impl Registrar<'_> {
    /// Registers a family and notes the series names it yields.
    pub fn declare(&mut self, name: &str, help: &str, metric: impl Metric) {
        let suffixes: &[&str] = match metric.metric_type() {
            MetricType::Counter => &["_total"],
            MetricType::Histogram => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        self.declared.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        self.registry.register(name, help, metric);
    }

    /// Registers a collector of values that exist only at scrape time.
    pub fn collector(&mut self, collector: Box<dyn Collector>) {
        self.registry.register_collector(collector);
    }

    /// Registers text written after the registry's own at scrape time.
    pub fn text(&mut self, text: TextCollector) {
        self.texts.push(text);
    }

    /// Whether recorders should record (false under [`Metrics::disabled`]).
    pub fn enabled(&self) -> bool {
        self.enabled
    }
}

/// Declares a metric set: a struct of metric handles, each with its series name,
/// help and constructor written once, next to each other, and its [`MetricSet`]
/// registration.
///
/// ```ignore
/// metric_set! {
///     pub struct EdgeMetrics {
///         pub requests: Family<RequestLabels, Counter> =
///             ("http_requests", "Requests served", Family::default());
///     }
/// }
/// ```
#[macro_export]
macro_rules! metric_set {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$fmeta:meta])*
                $fvis:vis $field:ident : $ty:ty = ($metric:literal, $help:literal, $ctor:expr);
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug)]
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $ty, )*
        }

        impl $name {
            /// The set's families: (name, help), in registration order.
            #[allow(dead_code)]
            pub const FAMILIES: &'static [(&'static str, &'static str)] = &[$(($metric, $help)),*];
        }

        impl $crate::metrics::MetricSet for $name {
            fn register(r: &mut $crate::metrics::Registrar<'_>) -> Self {
                $(
                    let $field: $ty = $ctor;
                    r.declare($metric, $help, $field.clone());
                )*
                $name { $($field),* }
            }
        }
    };
}

// === Metrics ===

struct Exposition {
    registry: Registry,
    /// Series names of every registered family, sampled or not (collectors' series
    /// appear only in a scrape).
    declared: BTreeSet<String>,
    texts: Vec<TextCollector>,
}

/// The registry of the process: the crates' metric sets, the process and GPU
/// collectors, and the encoding. Cheap to share (`Arc`); pass it explicitly.
///
/// Its lock is taken when a set registers and at scrape time, never by a request:
/// recording goes through the handles of a set.
pub struct Metrics {
    enabled: bool,
    exposition: Mutex<Exposition>,
    sets: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::with_enabled(true)
    }

    /// A registry whose recorders do nothing, to measure what recording costs.
    pub fn disabled() -> Metrics {
        Metrics::with_enabled(false)
    }

    fn with_enabled(enabled: bool) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(crate::process::ProcessCollector::new()));
        match crate::gpu::GpuCollector::probe() {
            Ok(gpu) => registry.register_collector(Box::new(gpu)),
            // The usual case on CPU-only machines: say so once, export nothing.
            Err(why) => tracing::debug!(reason = %why, "no GPU metrics"),
        }
        Metrics {
            enabled,
            exposition: Mutex::new(Exposition {
                registry,
                declared: BTreeSet::new(),
                texts: Vec::new(),
            }),
            sets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether recorders should record; checked once per request or batch.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The metric set `S`, registered on first use; every later call returns the
    /// same handles, so each series is registered once however many components
    /// record into it.
    pub fn set<S: MetricSet>(&self) -> Arc<S> {
        let mut sets = self.sets.lock();
        if let Some(s) = sets.get(&TypeId::of::<S>()) {
            return s.clone().downcast::<S>().expect("sets are keyed by their own type id");
        }
        let set = {
            let mut e = self.exposition.lock();
            let Exposition {
                registry,
                declared,
                texts,
            } = &mut *e;
            Arc::new(S::register(&mut Registrar {
                registry,
                declared,
                texts,
                enabled: self.enabled,
            }))
        };
        sets.insert(TypeId::of::<S>(), set.clone());
        set
    }

    /// The series names every registered family can produce, with the suffixes
    /// Prometheus sees (`_total`, `_bucket`, `_sum`, `_count`), whether or not they
    /// have a sample yet: what dashboards and rules may name.
    pub fn declared_series(&self) -> BTreeSet<String> {
        self.exposition.lock().declared.clone()
    }

    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let e = self.exposition.lock();
        prometheus_client::encoding::text::encode_registry(&mut out, &e.registry)
            .expect("writing to a String cannot fail");
        for text in &e.texts {
            text(&mut out);
        }
        out.push_str("# EOF\n");
        out
    }

    /// The classic Prometheus text format of the same metrics (no exemplars, counters
    /// named with `_total`), for readers that do not negotiate OpenMetrics.
    pub fn encode_classic(&self) -> String {
        to_classic(&self.encode())
    }
}

// === Lock-free windows ===

/// The last [`Recent::LEN`] values of a per-replica quantity (queue waits, service
/// times), written by requests without a lock and read at scrape time. A reader may
/// see a slot being overwritten: a sample of the window, which is what it is for.
#[derive(Debug)]
pub struct Recent {
    slots: Box<[std::sync::atomic::AtomicU64]>,
    written: std::sync::atomic::AtomicUsize,
}

impl Default for Recent {
    fn default() -> Self {
        Recent {
            slots: (0..Recent::LEN).map(|_| std::sync::atomic::AtomicU64::new(0)).collect(),
            written: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl Recent {
    pub const LEN: usize = 512;

    pub fn push(&self, v: f64) {
        use std::sync::atomic::Ordering::Relaxed;
        let i = self.written.fetch_add(1, Relaxed) % Recent::LEN;
        self.slots[i].store(v.to_bits(), Relaxed);
    }

    fn values(&self) -> Vec<f64> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.written.load(Relaxed).min(Recent::LEN);
        self.slots[..n]
            .iter()
            .map(|s| f64::from_bits(s.load(Relaxed)))
            .collect()
    }

    pub fn quantile(&self, q: f64) -> Option<f64> {
        let mut v = self.values();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[((v.len() as f64 - 1.0) * q).round() as usize])
    }

    pub fn mean(&self) -> Option<f64> {
        let v = self.values();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

// === Text formats ===

/// Every series name an exposition offers: each family from its TYPE line plus the
/// sample names Prometheus derives (`_total`, `_bucket`, `_sum`, `_count`). Manifests,
/// alert rules and dashboards are checked against this set.
pub fn series_names(exposition: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let (Some(name), Some(kind)) = (it.next(), it.next()) else {
            continue;
        };
        out.insert(name.to_string());
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "summary" => &["_sum", "_count"],
            _ => &[],
        };
        for s in suffixes {
            out.insert(format!("{name}{s}"));
        }
    }
    out
}

/// Rewrites OpenMetrics text as classic Prometheus text: counter families are named
/// with their `_total` suffix, and exemplars, `# UNIT` and `# EOF` are dropped.
pub fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let lines: Vec<&str> = openmetrics.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line == "# EOF" || line.starts_with("# UNIT ") {
            i += 1;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            let type_line = lines.get(i + 1).copied().unwrap_or_default();
            let is_counter = type_line == format!("# TYPE {name} counter");
            if is_counter {
                let _ = writeln!(out, "# HELP {name}_total{}", &rest[name.len()..]);
                let _ = writeln!(out, "# TYPE {name}_total counter");
                i += 2;
                continue;
            }
        }
        match line.find(" # {") {
            Some(cut) if !line.starts_with('#') => out.push_str(&line[..cut]),
            _ => out.push_str(line),
        }
        out.push('\n');
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    crate::metric_set! {
        struct Demo {
            hits: Family<OutcomeLabels, Counter> = ("demo_hits", "Hits", Family::default());
            wait: Histogram = ("demo_wait_seconds", "Wait", buckets::latency());
        }
    }

    #[test]
    fn a_set_registers_once_and_declares_its_series() {
        let m = Metrics::new();
        let a = m.set::<Demo>();
        let b = m.set::<Demo>();
        a.hits.get_or_create(&OutcomeLabels { outcome: "ok" }).inc();
        a.wait.observe(0.001);
        assert_eq!(b.hits.get_or_create(&OutcomeLabels { outcome: "ok" }).get(), 1);
        let declared = m.declared_series();
        for name in [
            "demo_hits_total",
            "demo_wait_seconds_bucket",
            "demo_wait_seconds_sum",
            "demo_wait_seconds_count",
        ] {
            assert!(declared.contains(name), "{name}");
        }
        assert_eq!(Demo::FAMILIES.len(), 2);
        let text = m.encode();
        assert_eq!(text.matches("# TYPE demo_hits counter").count(), 1, "{text}");
        assert!(text.contains("demo_hits_total{outcome=\"ok\"} 1"));
        assert!(text.contains("demo_wait_seconds_count 1"), "{text}");
        assert!(text.contains("process_resident_memory_bytes"));
        assert!(text.ends_with("# EOF\n"));
        let classic = to_classic(&text);
        assert!(classic.contains("# TYPE demo_hits_total counter"));
        assert!(!classic.contains("# EOF"));
    }

    #[test]
    fn observability_depends_on_no_domain_crate() {
        let manifest = include_str!("../Cargo.toml");
        let deps = manifest.split("[dependencies]").nth(1).unwrap_or_default();
        assert!(!deps.contains("lattice-"), "{deps}");
    }

    #[test]
    fn recent_keeps_the_last_values() {
        let r = Recent::default();
        assert_eq!(r.mean(), None);
        for i in 0..Recent::LEN + 10 {
            r.push(if i < 10 { 1000.0 } else { 1.0 });
        }
        assert_eq!(r.mean(), Some(1.0));
        assert_eq!(r.quantile(0.95), Some(1.0));
    }
}
