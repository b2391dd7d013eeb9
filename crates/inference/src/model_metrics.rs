//! The inference plane's metric set: every `ai_*` and `inference_*` series is declared
//! here, once ([`ModelFamilies`]), with the per-version recorders that write them and
//! the scrape-time collector of queue depth, QPS, drift and recent-latency quantiles.
//! The names are API: the autoscaling manifests, alert rules and dashboards read them.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{atomic::AtomicI64, Arc, OnceLock},
    time::{Duration, Instant},
};

use lattice_observability::{
    encode::gauge_family,
    metric_set,
    metrics::{buckets, ExemplarHistogramFamily, HistogramFamily, Recent, Registrar, TraceLabel},
    quality::DriftFeature,
    MetricSet,
};
use parking_lot::Mutex;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, exemplar::HistogramWithExemplars, family::Family, gauge::Gauge, histogram::Histogram},
};

// === Labels ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ModelLabels {
    pub model_name: String,
    pub model_version: String,
}

/// Top-1 confidence of a response, bucketed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ConfidenceLevel {
    /// >= 0.9
    High,
    /// >= 0.6
    Medium,
    Low,
    /// The model produces no probabilities (embeddings) or the request failed.
    None,
}

impl ConfidenceLevel {
    pub fn of(top1: Option<f64>) -> ConfidenceLevel {
        match top1 {
            Some(c) if c >= 0.9 => ConfidenceLevel::High,
            Some(c) if c >= 0.6 => ConfidenceLevel::Medium,
            Some(_) => ConfidenceLevel::Low,
            None => ConfidenceLevel::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConfidenceLevel::High => "high",
            ConfidenceLevel::Medium => "medium",
            ConfidenceLevel::Low => "low",
            ConfidenceLevel::None => "none",
        }
    }
}

/// The closed set of inference outcomes.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ErrorType {
    None,
    /// The request's deadline passed before it was computed.
    ModelTimeout,
    /// Wrong input name, datatype, shape, count, or batch too large.
    InputSchemaViolation,
    /// The queue was full.
    Overloaded,
    /// The client went away.
    Cancelled,
    /// The model or version is not loaded, or is shutting down.
    Unavailable,
    /// The engine failed.
    Internal,
}

impl ErrorType {
    pub const ALL: [ErrorType; 7] = [
        ErrorType::None,
        ErrorType::ModelTimeout,
        ErrorType::InputSchemaViolation,
        ErrorType::Overloaded,
        ErrorType::Cancelled,
        ErrorType::Unavailable,
        ErrorType::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::None => "none",
            ErrorType::ModelTimeout => "model_timeout",
            ErrorType::InputSchemaViolation => "input_schema_violation",
            ErrorType::Overloaded => "overloaded",
            ErrorType::Cancelled => "cancelled",
            ErrorType::Unavailable => "unavailable",
            ErrorType::Internal => "internal",
        }
    }
}

impl EncodeLabelValue for ConfidenceLevel {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(self.as_str())
    }
}

impl EncodeLabelValue for ErrorType {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub model_name: String,
    pub model_version: String,
    pub confidence_level: ConfidenceLevel,
    pub error_type: ErrorType,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub model_name: String,
    pub model_version: String,
    pub error_type: ErrorType,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriftLabels {
    model_name: String,
    model_version: String,
    feature: String,
}

/// A gauge of work in flight, raised and lowered by the code that does the work
/// (always through a drop guard, so a cancelled request gives it back).
pub type InFlight = Gauge<i64, AtomicI64>;

// === Families ===

metric_set! {
    /// Every registered `ai_*` and `inference_*` family.
    pub struct ModelFamilies {
        pub inference_latency: ExemplarHistogramFamily<LatencyLabels> = (
            "ai_inference_latency_seconds",
            "End-to-end inference latency (validation, queue, compute), by model, top-1 confidence level and outcome; exemplars carry trace_id",
            Family::new_with_constructor(buckets::latency_with_exemplars)
        );
        pub queue_duration: HistogramFamily<ModelLabels> = (
            "ai_inference_queue_duration_seconds",
            "Time a request waited in the model's queue",
            Family::new_with_constructor(buckets::latency)
        );
        pub compute_duration: HistogramFamily<ModelLabels> = (
            "ai_inference_compute_duration_seconds",
            "Time one batch spent in compute (input preparation, engine, output)",
            Family::new_with_constructor(buckets::latency)
        );
        pub request_duration: HistogramFamily<ModelLabels> = (
            "ai_inference_request_duration_seconds",
            "Time from enqueue to answer (queue plus compute)",
            Family::new_with_constructor(buckets::latency)
        );
        pub batch_size: HistogramFamily<ModelLabels> = (
            "ai_inference_batch_size",
            "Items per executed batch",
            Family::new_with_constructor(buckets::batch)
        );
        pub concurrent_requests: Family<ModelLabels, InFlight> = (
            "inference_concurrent_requests",
            "Inference requests in progress (queued or computing)",
            Family::default()
        );
        pub success: Family<ModelLabels, Counter> = (
            "ai_inference_success",
            "Inference requests that succeeded",
            Family::default()
        );
        pub failure: Family<FailureLabels, Counter> = (
            "ai_inference_failure",
            "Inference requests that failed, by error type",
            Family::default()
        );
        pub load_duration: HistogramFamily<ModelLabels> = (
            "ai_model_load_duration_seconds",
            "Cold start of a model version: engine sessions built and a warm-up inference run",
            Family::new_with_constructor(buckets::load)
        );
        pub confidence: HistogramFamily<ModelLabels> = (
            "ai_prediction_confidence",
            "Top-1 probability of each predicted item",
            Family::new_with_constructor(buckets::probability)
        );
        pub entropy: HistogramFamily<ModelLabels> = (
            "ai_prediction_entropy_nats",
            "Entropy of each predicted item's probability vector",
            Family::new_with_constructor(buckets::entropy)
        );
        pub batch_confidence_stddev: HistogramFamily<ModelLabels> = (
            "ai_batch_confidence_stddev",
            "Standard deviation of top-1 confidence across the items of one executed batch",
            Family::new_with_constructor(buckets::probability)
        );
    }
}

/// Series that exist only at scrape time: (name, help).
const PENDING: (&str, &str) = ("ai_inference_pending_requests", "Requests waiting in the model's queue");
const QPS: (&str, &str) = ("ai_inference_qps", "Completed inference requests over the last second");
const DRIFT: (&str, &str) = (
    "ai_feature_drift_score",
    "Kolmogorov-Smirnov statistic between a feature's reference distribution and its recent window",
);
const RECENT_LATENCY: &str = "ai_inference_latency_recent_seconds";

// === Scrape-time state ===

/// Completions over the last second, in 100 ms slots.
#[derive(Debug)]
struct RateWindow {
    slots: [u64; 10],
    slot_start: Instant,
    current: usize,
}

impl RateWindow {
    const SLOT: Duration = Duration::from_millis(100);

    fn new() -> RateWindow {
        RateWindow {
            slots: [0; 10],
            slot_start: Instant::now(),
            current: 0,
        }
    }

    fn advance(&mut self, now: Instant) {
        let mut elapsed = now.saturating_duration_since(self.slot_start);
        let mut steps = 0;
        while elapsed >= Self::SLOT && steps < 10 {
            self.current = (self.current + 1) % 10;
            self.slots[self.current] = 0;
            self.slot_start += Self::SLOT;
            elapsed -= Self::SLOT;
            steps += 1;
        }
        if steps == 10 {
            self.slot_start = now;
        }
    }

    fn add(&mut self, now: Instant) {
        self.advance(now);
        self.slots[self.current] += 1;
    }

    fn per_second(&mut self, now: Instant) -> f64 {
        self.advance(now);
        self.slots.iter().sum::<u64>() as f64
    }
}

/// Latencies of the last requests, for client-side style quantiles, with the
/// cumulative sum and count a summary carries.
#[derive(Debug, Default)]
struct LatencyWindow {
    values: std::collections::VecDeque<f64>,
    sum: f64,
    count: u64,
}

const LATENCY_WINDOW: usize = 1024;

/// One model version's recent completions, written per request through its
/// [`ModelRecorder`] and read at scrape time.
#[derive(Debug)]
struct ModelRecent {
    qps: RateWindow,
    latency: LatencyWindow,
}

/// A model version's drift features (name, reference and window), in the order of
/// its config.
type DriftFeatures = Arc<Mutex<Vec<(String, DriftFeature)>>>;

/// Reads a live value at scrape time (queue depth from a scheduler).
pub type GaugeSource = Box<dyn Fn() -> i64 + Send + Sync>;

/// Per-model state read at scrape time.
#[derive(Default)]
struct ModelWindows {
    /// Each entry has its own lock, so requests of different models do not contend
    /// and a request never takes this map's lock.
    recent: HashMap<ModelLabels, Arc<Mutex<ModelRecent>>>,
    /// Keyed by model version, tagged with the id of the loaded instance that owns it;
    /// shared with that instance's recorder.
    drift: HashMap<ModelLabels, (u64, DriftFeatures)>,
    /// (id of the loaded version instance, its queue depth)
    pending: HashMap<ModelLabels, (u64, GaugeSource)>,
}

// === ModelMetrics ===

/// The inference plane's metrics: its families, and the windows its collector reads.
/// Registered once per registry, through `Metrics::set::<ModelMetrics>()`.
pub struct ModelMetrics {
    enabled: bool,
    pub families: ModelFamilies,
    windows: Arc<Mutex<ModelWindows>>,
    /// Queue waits of this replica's recent requests, for the scaling signals;
    /// written without a lock.
    queue_times: Recent,
    /// Compute time per item of recent batches.
    service_times: Recent,
}

impl std::fmt::Debug for ModelMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelMetrics").finish_non_exhaustive()
    }
}

impl MetricSet for ModelMetrics {
    fn register(r: &mut Registrar<'_>) -> Self {
        let families = ModelFamilies::register(r);
        let windows = Arc::new(Mutex::new(ModelWindows::default()));
        r.collector(Box::new(WindowCollector(windows.clone())));
        let summary = windows.clone();
        r.text(Box::new(move |out| encode_summary(&summary, out)));
        ModelMetrics {
            enabled: r.enabled(),
            families,
            windows,
            queue_times: Recent::default(),
            service_times: Recent::default(),
        }
    }
}

impl ModelMetrics {
    /// The metric handles of one model version. Family entries are never removed, so
    /// the handles stay valid for as long as the version serves. A reload shares the
    /// windows of the instance it replaces; [`ModelMetrics::track_model`] makes them
    /// read at scrape time.
    pub fn recorder(self: &Arc<Self>, model: &ModelLabels) -> ModelRecorder {
        let recent = self.windows.lock().recent.get(model).cloned().unwrap_or_else(|| {
            Arc::new(Mutex::new(ModelRecent {
                qps: RateWindow::new(),
                latency: LatencyWindow::default(),
            }))
        });
        let f = &self.families;
        ModelRecorder {
            enabled: self.enabled,
            labels: model.clone(),
            concurrent: f.concurrent_requests.get_or_create(model).clone(),
            queue_duration: f.queue_duration.get_or_create(model).clone(),
            compute_duration: f.compute_duration.get_or_create(model).clone(),
            request_duration: f.request_duration.get_or_create(model).clone(),
            batch_size: f.batch_size.get_or_create(model).clone(),
            confidence: f.confidence.get_or_create(model).clone(),
            entropy: f.entropy.get_or_create(model).clone(),
            batch_confidence_stddev: f.batch_confidence_stddev.get_or_create(model).clone(),
            success: f.success.get_or_create(model).clone(),
            latency_ok: Arc::default(),
            latency: f.inference_latency.clone(),
            failure: f.failure.clone(),
            recent,
            drift: DriftFeatures::default(),
            set: self.clone(),
        }
    }

    /// Registers a loaded model version (`id` tells a reload of the same version
    /// apart from the instance it replaces) once it serves: its recorder's windows,
    /// its live queue depth and its drift features (name, optional fixed reference).
    pub fn track_model(
        &self,
        recorder: &ModelRecorder,
        id: u64,
        pending: GaugeSource,
        features: Vec<(String, Vec<f64>)>,
        reference_size: usize,
        window: usize,
    ) {
        let model = recorder.labels();
        *recorder.drift.lock() = features
            .into_iter()
            .map(|(name, reference)| (name, DriftFeature::new(reference, reference_size, window)))
            .collect();
        let mut w = self.windows.lock();
        // Registered here, not when the recorder was made: between the two the
        // instance this one replaces may stop serving and forget the entry, and a
        // load that fails must leave none behind.
        w.pending.insert(model.clone(), (id, pending));
        w.recent.insert(model.clone(), recorder.recent.clone());
        w.drift.insert(model.clone(), (id, recorder.drift.clone()));
    }

    /// Forgets a model version's scrape-time state when the instance `id` stops
    /// serving, unless a newer instance of the same version already took over.
    pub fn forget_model(&self, model: &ModelLabels, id: u64) {
        let mut w = self.windows.lock();
        if w.pending.get(model).is_none_or(|(i, _)| *i != id) {
            return;
        }
        w.pending.remove(model);
        w.recent.remove(model);
        if w.drift.get(model).is_some_and(|(i, _)| *i == id) {
            w.drift.remove(model);
        }
    }

    /// Current drift score of one feature (tests and the scrape use this).
    pub fn drift_score(&self, model: &ModelLabels, feature: &str) -> Option<f64> {
        let list = self.windows.lock().drift.get(model)?.1.clone();
        let list = list.lock();
        list.iter().find(|(n, _)| n == feature)?.1.score()
    }

    /// Time one request waited in a queue (seconds).
    pub fn observe_queue_time(&self, secs: f64) {
        self.queue_times.push(secs);
    }

    /// Compute time per item of one executed batch (seconds).
    pub fn observe_service_time(&self, secs: f64) {
        self.service_times.push(secs);
    }

    /// p95 queue wait of this replica's recent requests, in seconds.
    pub fn queue_time_p95(&self) -> Option<f64> {
        self.queue_times.quantile(0.95)
    }

    /// Mean compute time per item over the recent window, in seconds.
    pub fn service_time_mean(&self) -> Option<f64> {
        self.service_times.mean()
    }

    /// Requests this replica completed over the last second, all models together.
    pub fn qps(&self) -> f64 {
        let now = Instant::now();
        self.windows
            .lock()
            .recent
            .values()
            .map(|r| r.lock().qps.per_second(now))
            .sum()
    }
}

// === Collector ===

struct WindowCollector(Arc<Mutex<ModelWindows>>);

impl std::fmt::Debug for WindowCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowCollector").finish_non_exhaustive()
    }
}

impl Collector for WindowCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = Instant::now();
        let w = self.0.lock();
        let mut pending: Vec<(ModelLabels, i64)> = w.pending.iter().map(|(m, (_, f))| (m.clone(), f())).collect();
        pending.sort_by(|a, b| a.0.cmp(&b.0));
        gauge_family(&mut enc, PENDING.0, PENDING.1, pending)?;
        let mut qps: Vec<(ModelLabels, f64)> = w
            .recent
            .iter()
            .map(|(m, r)| (m.clone(), r.lock().qps.per_second(now)))
            .collect();
        qps.sort_by(|a, b| a.0.cmp(&b.0));
        gauge_family(&mut enc, QPS.0, QPS.1, qps)?;
        let mut drift = Vec::new();
        for (m, (_, list)) in &w.drift {
            for (name, f) in list.lock().iter() {
                if let Some(score) = f.score() {
                    drift.push((
                        DriftLabels {
                            model_name: m.model_name.clone(),
                            model_version: m.model_version.clone(),
                            feature: name.clone(),
                        },
                        score,
                    ));
                }
            }
        }
        gauge_family(&mut enc, DRIFT.0, DRIFT.1, drift)
    }
}

/// `ai_inference_latency_recent_seconds`: p50/p95/p99 over each model's last
/// 1024 successful requests. prometheus-client has no summary type, so it is
/// written here, in the shape both text formats share.
fn encode_summary(windows: &Mutex<ModelWindows>, out: &mut String) {
    let recent: Vec<(ModelLabels, Arc<Mutex<ModelRecent>>)> = windows
        .lock()
        .recent
        .iter()
        .map(|(m, r)| (m.clone(), r.clone()))
        .collect();
    let mut models: Vec<(ModelLabels, Vec<f64>, f64, u64)> = recent
        .into_iter()
        .filter_map(|(m, r)| {
            let r = r.lock();
            let lw = &r.latency;
            (!lw.values.is_empty()).then(|| (m, lw.values.iter().copied().collect(), lw.sum, lw.count))
        })
        .collect();
    if models.is_empty() {
        return;
    }
    models.sort_by(|a, b| a.0.cmp(&b.0));
    let name = RECENT_LATENCY;
    let _ = writeln!(out, "# HELP {name} Inference latency quantiles over the last {LATENCY_WINDOW} successful requests of this process (histograms are the source of truth).");
    let _ = writeln!(out, "# TYPE {name} summary");
    for (m, mut v, sum, count) in models {
        let labels = format!("model_name=\"{}\",model_version=\"{}\"", m.model_name, m.model_version);
        v.sort_by(f64::total_cmp);
        for q in [0.5, 0.95, 0.99] {
            let i = ((v.len() as f64 - 1.0) * q).round() as usize;
            let _ = writeln!(out, "{name}{{{labels},quantile=\"{q}\"}} {}", v[i]);
        }
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

// === ModelRecorder ===

/// One model version's metric handles, resolved once when the version loads, so a
/// request neither hashes label sets nor takes a family's lock: at a few µs per
/// request (the compute-light model) those lookups were a visible share of the
/// server's own cost. Cheap to clone; every handle shares its series.
#[derive(Clone)]
pub struct ModelRecorder {
    enabled: bool,
    labels: ModelLabels,
    pub concurrent: InFlight,
    pub queue_duration: Histogram,
    pub compute_duration: Histogram,
    pub request_duration: Histogram,
    pub batch_size: Histogram,
    pub confidence: Histogram,
    pub entropy: Histogram,
    pub batch_confidence_stddev: Histogram,
    success: Counter,
    /// Successful requests' latency, indexed by `ConfidenceLevel as usize`; each
    /// series is created on its first observation, as a family would, so levels a
    /// model never produces stay out of the exposition.
    latency_ok: Arc<[OnceLock<HistogramWithExemplars<TraceLabel>>; 4]>,
    /// Failures are rare: their series are looked up when they happen.
    latency: ExemplarHistogramFamily<LatencyLabels>,
    failure: Family<FailureLabels, Counter>,
    recent: Arc<Mutex<ModelRecent>>,
    /// Filled by [`ModelMetrics::track_model`] once the version serves.
    drift: DriftFeatures,
    /// The set, for the replica-wide windows (queue and service times).
    set: Arc<ModelMetrics>,
}

impl std::fmt::Debug for ModelRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRecorder")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl ModelRecorder {
    fn latency_series(
        &self,
        confidence_level: ConfidenceLevel,
        error_type: ErrorType,
    ) -> HistogramWithExemplars<TraceLabel> {
        self.latency
            .get_or_create(&LatencyLabels {
                model_name: self.labels.model_name.clone(),
                model_version: self.labels.model_version.clone(),
                confidence_level,
                error_type,
            })
            .clone()
    }

    /// Whether recorders should record; checked once per request or batch.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn labels(&self) -> &ModelLabels {
        &self.labels
    }

    /// Records the cold start of this version (sessions built, warm-up answered);
    /// its series is made here, so a load that fails leaves none behind.
    pub fn observe_load(&self, took: Duration) {
        self.set
            .families
            .load_duration
            .get_or_create(&self.labels)
            .observe(took.as_secs_f64());
    }

    /// The set this recorder belongs to.
    pub fn set(&self) -> &Arc<ModelMetrics> {
        &self.set
    }

    /// Feeds one item's feature values, in the order of the features given to
    /// [`ModelMetrics::track_model`].
    pub fn observe_features(&self, values: &[f64]) {
        if !self.enabled {
            return;
        }
        for ((_, f), v) in self.drift.lock().iter_mut().zip(values) {
            f.observe(*v);
        }
    }

    /// Records one finished inference request.
    pub fn observe_inference(&self, latency: Duration, top1: Option<f64>, error: ErrorType, trace_id: Option<String>) {
        if !self.enabled {
            return;
        }
        let secs = latency.as_secs_f64();
        let exemplar = trace_id.map(|trace_id| TraceLabel { trace_id });
        let level = ConfidenceLevel::of(top1);
        if error == ErrorType::None {
            self.latency_ok[level as usize]
                .get_or_init(|| self.latency_series(level, error))
                .observe(secs, exemplar, None);
            self.success.inc();
        } else {
            self.latency_series(level, error).observe(secs, exemplar, None);
            self.failure
                .get_or_create(&FailureLabels {
                    model_name: self.labels.model_name.clone(),
                    model_version: self.labels.model_version.clone(),
                    error_type: error,
                })
                .inc();
        }
        let mut r = self.recent.lock();
        r.qps.add(Instant::now());
        if error == ErrorType::None {
            let lw = &mut r.latency;
            if lw.values.len() == LATENCY_WINDOW {
                lw.values.pop_front();
            }
            lw.values.push_back(secs);
            lw.sum += secs;
            lw.count += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use lattice_observability::Metrics;

    use super::*;

    fn labels() -> ModelLabels {
        ModelLabels {
            model_name: "m".into(),
            model_version: "1".into(),
        }
    }

    #[test]
    fn exposition_names_and_exemplars() {
        let m = Metrics::new();
        let set = m.set::<ModelMetrics>();
        let rec = set.recorder(&labels());
        set.track_model(&rec, 1, Box::new(|| 7), Vec::new(), 1, 1);
        rec.observe_inference(
            Duration::from_millis(3),
            Some(0.95),
            ErrorType::None,
            Some("abc".into()),
        );
        rec.observe_inference(Duration::from_millis(3), None, ErrorType::Overloaded, None);
        let text = m.encode();
        assert!(
            text.contains("confidence_level=\"high\",error_type=\"none\"} 1 # {trace_id=\"abc\"} 0.003"),
            "exemplar on the bucket the observation fell in: {text}"
        );
        assert!(text
            .contains("ai_inference_failure_total{model_name=\"m\",model_version=\"1\",error_type=\"overloaded\"} 1"));
        assert!(text.contains("ai_inference_pending_requests{model_name=\"m\",model_version=\"1\"} 7"));
        assert!(text.contains("ai_inference_qps{model_name=\"m\",model_version=\"1\"} 2"));
        assert!(text.contains("process_resident_memory_bytes"));
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains(
            "ai_inference_latency_recent_seconds{model_name=\"m\",model_version=\"1\",quantile=\"0.99\"} 0.003"
        ));
        let classic = lattice_observability::metrics::to_classic(&text);
        assert!(classic.contains("# TYPE ai_inference_success_total counter"));
        assert!(!classic.contains("# {trace_id"));
        assert!(m.declared_series().contains("ai_model_load_duration_seconds_bucket"));
    }

    #[test]
    fn windows_are_read_once_tracked_and_survive_the_replaced_instance() {
        let m = Metrics::new();
        let set = m.set::<ModelMetrics>();
        let qps_line = "ai_inference_qps{model_name=\"m\",model_version=\"1\"}";
        // A load that never serves (it failed) leaves no series behind.
        let failed = set.recorder(&labels());
        failed.observe_inference(Duration::from_millis(1), None, ErrorType::None, None);
        assert!(!m.encode().contains(qps_line));

        let old = set.recorder(&labels());
        set.track_model(&old, 1, Box::new(|| 0), Vec::new(), 1, 1);
        // Unload, then load again while a request still holds the old instance: the
        // new recorder is made, the old instance stops serving, then the new one is
        // tracked.
        let new = set.recorder(&labels());
        set.forget_model(&labels(), 1);
        set.track_model(&new, 2, Box::new(|| 0), Vec::new(), 1, 1);
        new.observe_inference(Duration::from_millis(1), Some(0.95), ErrorType::None, None);
        new.batch_size.observe(1.0);
        let text = m.encode();
        assert!(text.contains(&format!("{qps_line} 1")), "{text}");
        assert!(
            text.contains("ai_inference_batch_size_count{model_name=\"m\",model_version=\"1\"} 1"),
            "{text}"
        );
        // The old instance stopping again does not forget the new one.
        set.forget_model(&labels(), 1);
        assert!(m.encode().contains(qps_line));
    }

    #[test]
    fn rate_window_forgets_after_a_second() {
        let mut r = RateWindow::new();
        let t0 = Instant::now();
        for _ in 0..5 {
            r.add(t0);
        }
        assert_eq!(r.per_second(t0 + Duration::from_millis(500)), 5.0);
        assert_eq!(r.per_second(t0 + Duration::from_millis(1500)), 0.0);
    }
}
