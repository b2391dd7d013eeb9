//! The one metrics registry. Every metric name is declared here, once, as a field of
//! [`Metrics`]; the autoscaling manifests and alert rules name these series, so the
//! names are API.
//!
//! Histograms are the source of truth for latency. Values that exist only at scrape
//! time (QPS over the last second, queue gauges read from schedulers, drift scores,
//! windowed quantiles, process figures) come from collectors registered here.

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    sync::{atomic::AtomicI64, Arc, OnceLock},
    time::{Duration, Instant},
};

use std::borrow::Cow;

use parking_lot::Mutex;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::MetricType,
    metrics::{
        counter::Counter,
        exemplar::HistogramWithExemplars,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Metric, Registry},
};

use crate::{encode::gauge_family, quality::DriftFeature};

/// Content type of the OpenMetrics exposition (what Prometheus negotiates; it carries
/// exemplars).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text format, for every other reader.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

// === Labels ===

/// Edge request labels. Values are borrowed where they are static (protocol, common
/// methods), so recording a request allocates at most its route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `http` or `grpc`.
    pub protocol: Cow<'static, str>,
    /// HTTP method, or the gRPC method name.
    pub method: Cow<'static, str>,
    /// HTTP status, or the gRPC status code number.
    pub status_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub protocol: Cow<'static, str>,
    pub route: Cow<'static, str>,
    pub method: Cow<'static, str>,
}

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

/// Agent-plane frame counter labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameLabels {
    /// `in` (agent to orchestrator) or `out`.
    pub direction: &'static str,
    /// The frame's body: offer, assign, result, heartbeat, ...
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, or the gRPC code name of the failure (`cancelled`, `deadline_exceeded`, ...).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabels {
    pub tool: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemoryLabels {
    /// get, put or sync.
    pub op: &'static str,
    pub outcome: &'static str,
}

/// Gateway refusal labels: the tenant (a configured one, else `other`) and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub tenant: String,
    pub reason: &'static str,
}

/// What became of audit records: written, dropped (queue full) or failed (sink error).
#[derive(Clone, Debug)]
pub struct AuditCounters(Family<OutcomeLabels, Counter>);

impl AuditCounters {
    pub fn written(&self, n: u64) {
        self.0.get_or_create(&OutcomeLabels { outcome: "written" }).inc_by(n);
    }

    pub fn dropped(&self) {
        self.0.get_or_create(&OutcomeLabels { outcome: "dropped" }).inc();
    }

    pub fn failed(&self, n: u64) {
        self.0.get_or_create(&OutcomeLabels { outcome: "failed" }).inc_by(n);
    }

    pub fn get(&self, outcome: &'static str) -> u64 {
        self.0.get_or_create(&OutcomeLabels { outcome }).get()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolNameLabels {
    pub tool: String,
}

/// What the agent plane holds right now, read at scrape time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AgentLoad {
    /// Sessions with a live stream.
    pub established: usize,
    /// Sessions kept for their agent to resume.
    pub detached: usize,
    /// Queued tasks per priority level, 0 (background) to 5 (realtime).
    pub queued: [usize; 6],
}

pub type AgentSource = Box<dyn Fn() -> AgentLoad + Send + Sync>;

/// Exemplar label: the trace that produced an observation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabel {
    pub trace_id: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type ExemplarHistogramFamily<L> =
    Family<L, HistogramWithExemplars<TraceLabel>, fn() -> HistogramWithExemplars<TraceLabel>>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~13 s, doubling: covers the compute-light model and slow batches.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

fn latency_with_exemplars() -> HistogramWithExemplars<TraceLabel> {
    HistogramWithExemplars::new(exponential_buckets(0.0001, 2.0, 18))
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 8))
}

fn probability_histogram() -> Histogram {
    Histogram::new((1..=10).map(|i| f64::from(i) / 10.0))
}

fn entropy_histogram() -> Histogram {
    // Nats; ln(214) ~ 5.4 is Magika's maximum.
    Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
}

fn load_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

/// Registers a family and notes the series names it yields.
fn declare(r: &mut Registry, declared: &mut BTreeSet<String>, name: &str, help: &str, metric: impl Metric) {
    let suffixes: &[&str] = match metric.metric_type() {
        MetricType::Counter => &["_total"],
        MetricType::Histogram => &["_bucket", "_sum", "_count"],
        _ => &[""],
    };
    declared.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    r.register(name, help, metric);
}

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

/// Per-model state read at scrape time.
#[derive(Debug, Default)]
struct ModelWindows {
    /// Each entry has its own lock, so requests of different models do not contend
    /// and a request never takes the registry-wide lock.
    recent: HashMap<ModelLabels, Arc<Mutex<ModelRecent>>>,
    /// Keyed by model version, tagged with the id of the loaded instance that owns it;
    /// shared with that instance's recorder.
    drift: HashMap<ModelLabels, (u64, DriftFeatures)>,
}

/// Reads a live value at scrape time (queue depth from a scheduler).
/// A gauge of work in flight, raised and lowered by the code that does the work
/// (always through a drop guard, so a cancelled request gives it back).
pub type InFlight = Gauge<i64, AtomicI64>;

pub type GaugeSource = Box<dyn Fn() -> i64 + Send + Sync>;

/// What the replica holds right now, for the scaling signals; `None` while the
/// replica is not ready, so a warming or draining pod is missing rather than idle.
pub type LoadSource = Box<dyn Fn() -> Option<Load> + Send + Sync>;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Requests being computed.
    pub in_flight: usize,
    /// Requests waiting in queues.
    pub queued: usize,
    /// Requests the instances compute at once (instances x largest dynamic batch).
    pub capacity: usize,
}

const RECENT: usize = 512;

/// The last few hundred values of a per-replica quantity.
#[derive(Debug, Default)]
struct Recent(std::collections::VecDeque<f64>);

impl Recent {
    fn push(&mut self, v: f64) {
        if self.0.len() == RECENT {
            self.0.pop_front();
        }
        self.0.push_back(v);
    }

    fn quantile(&self, q: f64) -> Option<f64> {
        let mut v: Vec<f64> = self.0.iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[((v.len() as f64 - 1.0) * q).round() as usize])
    }

    fn mean(&self) -> Option<f64> {
        (!self.0.is_empty()).then(|| self.0.iter().sum::<f64>() / self.0.len() as f64)
    }
}

#[derive(Default)]
struct Sources {
    /// (labels, id of the loaded version instance, source)
    pending: Vec<(ModelLabels, u64, GaugeSource)>,
    load: Option<LoadSource>,
    agents: Option<AgentSource>,
    guard: lattice_scaling::ScaleInGuard,
    queue_times: Recent,
    service_times: Recent,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").field("pending", &self.pending.len()).finish()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PriorityLabel {
    priority: u8,
}

// === Metrics ===

/// Every metric of the process. Cheap to share (`Arc`); pass it explicitly.
pub struct Metrics {
    registry: Registry,
    /// Series names of every registered family, sampled or not (collectors' series
    /// appear only in a scrape).
    declared: BTreeSet<String>,
    enabled: bool,
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_request_duration: ExemplarHistogramFamily<RouteLabels>,
    pub inference_latency: ExemplarHistogramFamily<LatencyLabels>,
    pub queue_duration: HistogramFamily<ModelLabels>,
    pub compute_duration: HistogramFamily<ModelLabels>,
    pub request_duration: HistogramFamily<ModelLabels>,
    pub batch_size: HistogramFamily<ModelLabels>,
    pub concurrent_requests: Family<ModelLabels, Gauge<i64, AtomicI64>>,
    pub success: Family<ModelLabels, Counter>,
    pub failure: Family<FailureLabels, Counter>,
    pub load_duration: HistogramFamily<ModelLabels>,
    pub confidence: HistogramFamily<ModelLabels>,
    pub entropy: HistogramFamily<ModelLabels>,
    pub batch_confidence_stddev: HistogramFamily<ModelLabels>,
    pub agent_frames: Family<FrameLabels, Counter>,
    pub agent_tasks: Family<OutcomeLabels, Counter>,
    pub agent_dispatch: Histogram,
    pub agent_task_duration: Histogram,
    pub agent_resumes: Family<OutcomeLabels, Counter>,
    pub agent_heartbeat_rtt: Histogram,
    /// Frames dropped by the receiver's dedupe, by reason (duplicate, stale).
    pub agent_dropped: Family<OutcomeLabels, Counter>,
    pub agent_resent: Counter,
    pub agent_credit_waits: Family<OutcomeLabels, Counter>,
    pub memory_ops: Family<MemoryLabels, Counter>,
    pub tool_calls: Family<ToolLabels, Counter>,
    pub tool_duration: HistogramFamily<ToolNameLabels>,
    pub gateway_refusals: Family<RefusalLabels, Counter>,
    audit_records: Family<OutcomeLabels, Counter>,
    windows: Arc<Mutex<ModelWindows>>,
    sources: Arc<Mutex<Sources>>,
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
    /// A registry whose recorders do nothing, to measure what recording costs.
    pub fn disabled() -> Metrics {
        Metrics {
            enabled: false,
            ..Metrics::new()
        }
    }

    /// Whether recorders should record; checked once per request or batch.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let mut declared = BTreeSet::new();
        let http_requests = Family::<RequestLabels, Counter>::default();
        declare(
            &mut r,
            &mut declared,
            "http_requests",
            "Requests served, by protocol, method and status code",
            http_requests.clone(),
        );
        let http_request_duration: ExemplarHistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_with_exemplars);
        declare(
            &mut r,
            &mut declared,
            "http_request_duration_seconds",
            "Request duration at the edge, by protocol, route and method",
            http_request_duration.clone(),
        );
        let inference_latency: ExemplarHistogramFamily<LatencyLabels> =
            Family::new_with_constructor(latency_with_exemplars);
        declare(
            &mut r,
            &mut declared,
            "ai_inference_latency_seconds",
            "End-to-end inference latency (validation, queue, compute), by model, top-1 confidence level and outcome; exemplars carry trace_id",
            inference_latency.clone(),
        );
        let queue_duration: HistogramFamily<ModelLabels> = Family::new_with_constructor(latency_histogram);
        declare(
            &mut r,
            &mut declared,
            "ai_inference_queue_duration_seconds",
            "Time a request waited in the model's queue",
            queue_duration.clone(),
        );
        let compute_duration: HistogramFamily<ModelLabels> = Family::new_with_constructor(latency_histogram);
        declare(
            &mut r,
            &mut declared,
            "ai_inference_compute_duration_seconds",
            "Time one batch spent in compute (input preparation, engine, output)",
            compute_duration.clone(),
        );
        let request_duration: HistogramFamily<ModelLabels> = Family::new_with_constructor(latency_histogram);
        declare(
            &mut r,
            &mut declared,
            "ai_inference_request_duration_seconds",
            "Time from enqueue to answer (queue plus compute)",
            request_duration.clone(),
        );
        let batch_size: HistogramFamily<ModelLabels> = Family::new_with_constructor(batch_histogram);
        declare(
            &mut r,
            &mut declared,
            "ai_inference_batch_size",
            "Items per executed batch",
            batch_size.clone(),
        );
        let concurrent_requests = Family::<ModelLabels, Gauge<i64, AtomicI64>>::default();
        declare(
            &mut r,
            &mut declared,
            "inference_concurrent_requests",
            "Inference requests in progress (queued or computing)",
            concurrent_requests.clone(),
        );
        let success = Family::<ModelLabels, Counter>::default();
        declare(
            &mut r,
            &mut declared,
            "ai_inference_success",
            "Inference requests that succeeded",
            success.clone(),
        );
        let failure = Family::<FailureLabels, Counter>::default();
        declare(
            &mut r,
            &mut declared,
            "ai_inference_failure",
            "Inference requests that failed, by error type",
            failure.clone(),
        );
        let load_duration: HistogramFamily<ModelLabels> = Family::new_with_constructor(load_histogram);
        declare(
            &mut r,
            &mut declared,
            "ai_model_load_duration_seconds",
            "Cold start of a model version: engine sessions built and a warm-up inference run",
            load_duration.clone(),
        );
        let confidence: HistogramFamily<ModelLabels> = Family::new_with_constructor(probability_histogram);
        declare(
            &mut r,
            &mut declared,
            "ai_prediction_confidence",
            "Top-1 probability of each predicted item",
            confidence.clone(),
        );
        let entropy: HistogramFamily<ModelLabels> = Family::new_with_constructor(entropy_histogram);
        declare(
            &mut r,
            &mut declared,
            "ai_prediction_entropy_nats",
            "Entropy of each predicted item's probability vector",
            entropy.clone(),
        );
        let batch_confidence_stddev: HistogramFamily<ModelLabels> = Family::new_with_constructor(probability_histogram);
        declare(
            &mut r,
            &mut declared,
            "ai_batch_confidence_stddev",
            "Standard deviation of top-1 confidence across the items of one executed batch",
            batch_confidence_stddev.clone(),
        );
        let agent_frames = Family::<FrameLabels, Counter>::default();
        declare(
            &mut r,
            &mut declared,
            "lattice_agent_frames",
            "Agent-stream frames, by direction and body",
            agent_frames.clone(),
        );
        let agent_tasks = Family::<OutcomeLabels, Counter>::default();
        declare(
            &mut r,
            &mut declared,
            "lattice_agent_tasks",
            "Tasks finished, by outcome",
            agent_tasks.clone(),
        );
        let agent_dispatch = latency_histogram();
        declare(
            &mut r,
            &mut declared,
            "lattice_agent_dispatch_seconds",
            "Time from a task's offer to its assignment to a worker",
            agent_dispatch.clone(),
        );
        let agent_task_duration = latency_histogram();
        declare(
            &mut r,
            &mut declared,
            "lattice_agent_task_duration_seconds",
            "Time from a task's offer to its result",
            agent_task_duration.clone(),
        );
        let agent_resumes = Family::<OutcomeLabels, Counter>::default();
        declare(
            &mut r,
            &mut declared,
            "lattice_agent_hellos",
            "Agent handshakes, by outcome: fresh, resumed, or gap (session unknown)",
            agent_resumes.clone(),
        );
        let agent_heartbeat_rtt = latency_histogram();
        declare(
            &mut r,
            &mut declared,
            "lattice_agent_heartbeat_rtt_seconds",
            "Round trip of orchestrator heartbeats echoed by agents",
            agent_heartbeat_rtt.clone(),
        );
        let agent_dropped = Family::<OutcomeLabels, Counter>::default();
        declare(
            &mut r,
            &mut declared,
            "lattice_agent_frames_dropped",
            "Agent frames received again and dropped by dedupe (re-acknowledged, not re-processed), by reason",
            agent_dropped.clone(),
        );
        let agent_resent = Counter::default();
        declare(
            &mut r,
            &mut declared,
            "lattice_agent_frames_resent",
            "Frames resent to agents after they resumed a session",
            agent_resent.clone(),
        );
        let agent_credit_waits = Family::<OutcomeLabels, Counter>::default();
        declare(
            &mut r,
            &mut declared,
            "lattice_agent_credit_waits",
            "Requesters held back by their window: offers refused, or streams paused",
            agent_credit_waits.clone(),
        );
        let memory_ops = Family::<MemoryLabels, Counter>::default();
        declare(
            &mut r,
            &mut declared,
            "lattice_memory_ops",
            "Memory broker operations, by op and outcome (aborted = version conflict)",
            memory_ops.clone(),
        );
        let tool_calls = Family::<ToolLabels, Counter>::default();
        declare(
            &mut r,
            &mut declared,
            "lattice_tool_calls",
            "Tool gateway calls, by tool and outcome (cached = answered from the idempotency cache)",
            tool_calls.clone(),
        );
        let tool_duration: HistogramFamily<ToolNameLabels> = Family::new_with_constructor(latency_histogram);
        declare(
            &mut r,
            &mut declared,
            "lattice_tool_call_duration_seconds",
            "Tool gateway call duration, cache hits included",
            tool_duration.clone(),
        );
        let gateway_refusals = Family::<RefusalLabels, Counter>::default();
        declare(
            &mut r,
            &mut declared,
            "lattice_gateway_refusals",
            "Requests the gateway refused, by tenant (configured ones, else other) and reason (no_credential, expired, invalid_token, unknown_key, no_tenant, tenant_mismatch, scope, rate_fast, rate_steady, concurrency)",
            gateway_refusals.clone(),
        );
        let audit_records = Family::<OutcomeLabels, Counter>::default();
        declare(
            &mut r,
            &mut declared,
            "lattice_audit_records",
            "Audit records by outcome: written, dropped (queue full; the request was not held) or failed (sink error)",
            audit_records.clone(),
        );
        let windows = Arc::new(Mutex::new(ModelWindows::default()));
        let sources = Arc::new(Mutex::new(Sources::default()));
        r.register_collector(Box::new(ScrapeCollector {
            windows: windows.clone(),
            sources: sources.clone(),
        }));
        r.register_collector(Box::new(crate::process::ProcessCollector::new()));
        match crate::gpu::GpuCollector::probe() {
            Ok(gpu) => r.register_collector(Box::new(gpu)),
            // The usual case on CPU-only machines: say so once, export nothing.
            Err(why) => tracing::debug!(reason = %why, "no GPU metrics"),
        }
        Metrics {
            registry: r,
            declared,
            enabled: true,
            http_requests,
            http_request_duration,
            inference_latency,
            queue_duration,
            compute_duration,
            request_duration,
            batch_size,
            concurrent_requests,
            success,
            failure,
            load_duration,
            confidence,
            entropy,
            batch_confidence_stddev,
            agent_frames,
            agent_tasks,
            agent_dispatch,
            agent_task_duration,
            agent_resumes,
            agent_heartbeat_rtt,
            agent_dropped,
            agent_resent,
            agent_credit_waits,
            memory_ops,
            tool_calls,
            tool_duration,
            gateway_refusals,
            audit_records,
            windows,
            sources,
        }
    }

    /// The audit log's outcome counters.
    pub fn audit_counters(&self) -> AuditCounters {
        AuditCounters(self.audit_records.clone())
    }

    /// The series names every registered family can produce, with the suffixes
    /// Prometheus sees (`_total`, `_bucket`, `_sum`, `_count`), whether or not they
    /// have a sample yet: what dashboards and rules may name.
    pub fn declared_series(&self) -> &BTreeSet<String> {
        &self.declared
    }

    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        self.encode_summary(&mut out);
        out.push_str("# EOF\n");
        out
    }

    /// The classic Prometheus text format of the same metrics (no exemplars, counters
    /// named with `_total`), for readers that do not negotiate OpenMetrics.
    pub fn encode_classic(&self) -> String {
        to_classic(&self.encode())
    }

    /// `ai_inference_latency_recent_seconds`: p50/p95/p99 over each model's last
    /// 1024 successful requests. prometheus-client has no summary type, so it is
    /// written here, in the shape both text formats share.
    fn encode_summary(&self, out: &mut String) {
        let recent: Vec<(ModelLabels, Arc<Mutex<ModelRecent>>)> = self
            .windows
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
        let name = "ai_inference_latency_recent_seconds";
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

    /// The metric handles of one model version. Family entries are never removed, so
    /// the handles stay valid for as long as the version serves. A reload shares the
    /// windows of the instance it replaces; [`Metrics::track_model`] makes them read
    /// at scrape time.
    pub fn recorder(&self, model: &ModelLabels) -> ModelRecorder {
        let recent = self.windows.lock().recent.get(model).cloned().unwrap_or_else(|| {
            Arc::new(Mutex::new(ModelRecent {
                qps: RateWindow::new(),
                latency: LatencyWindow::default(),
            }))
        });
        ModelRecorder {
            enabled: self.enabled,
            labels: model.clone(),
            concurrent: self.concurrent_requests.get_or_create(model).clone(),
            queue_duration: self.queue_duration.get_or_create(model).clone(),
            compute_duration: self.compute_duration.get_or_create(model).clone(),
            request_duration: self.request_duration.get_or_create(model).clone(),
            batch_size: self.batch_size.get_or_create(model).clone(),
            confidence: self.confidence.get_or_create(model).clone(),
            entropy: self.entropy.get_or_create(model).clone(),
            batch_confidence_stddev: self.batch_confidence_stddev.get_or_create(model).clone(),
            success: self.success.get_or_create(model).clone(),
            latency_ok: Arc::default(),
            latency: self.inference_latency.clone(),
            failure: self.failure.clone(),
            recent,
            drift: DriftFeatures::default(),
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
        let mut sources = self.sources.lock();
        sources.pending.retain(|(m, _, _)| m != model);
        sources.pending.push((model.clone(), id, pending));
        *recorder.drift.lock() = features
            .into_iter()
            .map(|(name, reference)| (name, DriftFeature::new(reference, reference_size, window)))
            .collect();
        let mut w = self.windows.lock();
        // Registered here, not when the recorder was made: between the two the
        // instance this one replaces may stop serving and forget the entry, and a
        // load that fails must leave none behind.
        w.recent.insert(model.clone(), recorder.recent.clone());
        w.drift.insert(model.clone(), (id, recorder.drift.clone()));
    }

    /// Installs the replica's load source for the scaling signals.
    pub fn set_load_source(&self, source: LoadSource) {
        self.sources.lock().load = Some(source);
    }

    /// Installs the agent plane's source of session and queue gauges.
    pub fn set_agent_source(&self, source: AgentSource) {
        self.sources.lock().agents = Some(source);
    }

    /// One sample of the replica's saturation for the scale-in guard (the server
    /// takes one per second while ready).
    /// Replaces the scale-in guard's constants (and its history).
    pub fn set_guard_config(&self, config: lattice_scaling::GuardConfig) {
        self.sources.lock().guard = lattice_scaling::ScaleInGuard::new(config);
    }

    /// Mean compute time per item over the recent window, in seconds.
    pub fn service_time_mean(&self) -> Option<f64> {
        self.sources.lock().service_times.mean()
    }

    pub fn observe_saturation(&self, saturation: f64) {
        self.sources.lock().guard.observe(Instant::now(), saturation);
    }

    /// The pod-deletion-cost this replica should carry: its recent load, plus a
    /// large premium while the scale-in guard says it must not go.
    pub fn pod_deletion_cost(&self) -> i64 {
        let src = self.sources.lock();
        let premium = if src.guard.safe(Instant::now()) { 0 } else { 100_000 };
        src.guard.deletion_cost() + premium
    }

    /// Time one request waited in a queue (seconds).
    pub fn observe_queue_time(&self, secs: f64) {
        self.sources.lock().queue_times.push(secs);
    }

    /// Compute time per item of one executed batch (seconds).
    pub fn observe_service_time(&self, secs: f64) {
        self.sources.lock().service_times.push(secs);
    }

    /// Current drift score of one feature (tests and the scrape use this).
    pub fn drift_score(&self, model: &ModelLabels, feature: &str) -> Option<f64> {
        let list = self.windows.lock().drift.get(model)?.1.clone();
        let list = list.lock();
        list.iter().find(|(n, _)| n == feature)?.1.score()
    }

    /// Forgets a model version's scrape-time state when the instance `id` stops
    /// serving, unless a newer instance of the same version already took over.
    pub fn forget_model(&self, model: &ModelLabels, id: u64) {
        let mut sources = self.sources.lock();
        let before = sources.pending.len();
        sources.pending.retain(|(m, i, _)| !(m == model && *i == id));
        if sources.pending.len() == before {
            return;
        }
        let mut w = self.windows.lock();
        w.recent.remove(model);
        if w.drift.get(model).is_some_and(|(i, _)| *i == id) {
            w.drift.remove(model);
        }
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
    /// Filled by [`Metrics::track_model`] once the version serves.
    drift: DriftFeatures,
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

    /// Feeds one item's feature values, in the order of the features given to
    /// [`Metrics::track_model`].
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

#[derive(Debug)]
struct ScrapeCollector {
    windows: Arc<Mutex<ModelWindows>>,
    sources: Arc<Mutex<Sources>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriftLabels {
    model_name: String,
    model_version: String,
    feature: String,
}

/// Per-replica autoscaling signals, all gauges.
fn scaling_signals(
    enc: &mut DescriptorEncoder,
    load: Load,
    qps: f64,
    queue_p95: Option<f64>,
    service: Option<f64>,
) -> Result<(), std::fmt::Error> {
    use crate::process::gauge;
    let capacity = load.capacity.max(1) as f64;
    gauge(
        enc,
        "lattice_scaling_in_flight",
        "Requests being computed on this replica",
        Some(load.in_flight as f64),
    )?;
    gauge(
        enc,
        "lattice_scaling_queue_depth",
        "Requests waiting in this replica's queues",
        Some(load.queued as f64),
    )?;
    gauge(
        enc,
        "lattice_scaling_capacity",
        "Requests this replica computes at once",
        Some(capacity),
    )?;
    gauge(
        enc,
        "lattice_scaling_saturation",
        "(queued + in flight) / capacity: above 1 the replica is queueing",
        Some((load.queued + load.in_flight) as f64 / capacity),
    )?;
    gauge(
        enc,
        "lattice_scaling_qps",
        "Requests completed on this replica over the last second",
        Some(qps),
    )?;
    gauge(
        enc,
        "lattice_scaling_queue_p95_seconds",
        "p95 queue wait of this replica's recent requests",
        queue_p95,
    )?;
    // Little's law: the concurrency the arrivals need is rate x service time; divided by
    // this replica's capacity it is the replicas' worth of work arriving here, so an
    // AverageValue target of 1 asks for just enough replicas.
    gauge(
        enc,
        "lattice_scaling_demand_replicas",
        "Replicas' worth of work arriving at this replica (qps x service time / capacity)",
        service.map(|s| qps * s / capacity),
    )
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (pending, scaling, agents) = {
            let src = self.sources.lock();
            let pending: Vec<(ModelLabels, i64)> = src.pending.iter().map(|(m, _, f)| (m.clone(), f())).collect();
            let load = src.load.as_ref().and_then(|f| f());
            let scaling = load.map(|l| {
                (
                    l,
                    src.queue_times.quantile(0.95),
                    src.service_times.mean(),
                    (src.guard.safe(Instant::now()), src.guard.deletion_cost()),
                )
            });
            (pending, scaling, src.agents.as_ref().map(|f| f()))
        };
        if let Some(a) = agents {
            gauge_family(
                &mut enc,
                "lattice_agent_sessions",
                "Agent sessions, by state: established (stream live) or detached (kept for resume)",
                vec![
                    (StateLabel { state: "established" }, a.established as i64),
                    (StateLabel { state: "detached" }, a.detached as i64),
                ],
            )?;
            gauge_family(
                &mut enc,
                "lattice_agent_queue_depth",
                "Tasks queued for a worker, by priority (0 background .. 5 realtime)",
                a.queued
                    .iter()
                    .enumerate()
                    .map(|(p, n)| (PriorityLabel { priority: p as u8 }, *n as i64))
                    .collect(),
            )?;
        }
        if let Some((load, queue_p95, service, (safe, cost))) = scaling {
            let now = Instant::now();
            let qps: f64 = self
                .windows
                .lock()
                .recent
                .values()
                .map(|r| r.lock().qps.per_second(now))
                .sum();
            scaling_signals(&mut enc, load, qps, queue_p95, service)?;
            crate::process::gauge(
                &mut enc,
                "lattice_scaling_scale_in_safe",
                "1 when this replica's load stayed below 30% for 60 s (and no burst in the last 120 s): safe to remove",
                Some(if safe { 1.0 } else { 0.0 }),
            )?;
            crate::process::gauge(
                &mut enc,
                "lattice_scaling_pod_deletion_cost",
                "Mean saturation over the last 60 s x 1000: the pod-deletion-cost a controller should annotate (idle replicas go first)",
                Some(cost as f64),
            )?;
        }
        gauge_family(
            &mut enc,
            "ai_inference_pending_requests",
            "Requests waiting in the model's queue",
            pending,
        )?;
        let now = Instant::now();
        let w = self.windows.lock();
        let mut qps: Vec<(ModelLabels, f64)> = w
            .recent
            .iter()
            .map(|(m, r)| (m.clone(), r.lock().qps.per_second(now)))
            .collect();
        qps.sort_by(|a, b| a.0.cmp(&b.0));
        gauge_family(
            &mut enc,
            "ai_inference_qps",
            "Completed inference requests over the last second",
            qps,
        )?;
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
        gauge_family(
            &mut enc,
            "ai_feature_drift_score",
            "Kolmogorov-Smirnov statistic between a feature's reference distribution and its recent window",
            drift,
        )
    }
}

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
        let rec = m.recorder(&labels());
        m.track_model(&rec, 1, Box::new(|| 7), Vec::new(), 1, 1);
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
        let classic = to_classic(&text);
        assert!(classic.contains("# TYPE ai_inference_success_total counter"));
        assert!(!classic.contains("# {trace_id"));
        assert!(!classic.contains("# EOF"));
    }

    #[test]
    fn windows_are_read_once_tracked_and_survive_the_replaced_instance() {
        let m = Metrics::new();
        let qps_line = "ai_inference_qps{model_name=\"m\",model_version=\"1\"}";
        // A load that never serves (it failed) leaves no series behind.
        let failed = m.recorder(&labels());
        failed.observe_inference(Duration::from_millis(1), None, ErrorType::None, None);
        assert!(!m.encode().contains(qps_line));

        let old = m.recorder(&labels());
        m.track_model(&old, 1, Box::new(|| 0), Vec::new(), 1, 1);
        // Unload, then load again while a request still holds the old instance: the
        // new recorder is made, the old instance stops serving, then the new one is
        // tracked.
        let new = m.recorder(&labels());
        m.forget_model(&labels(), 1);
        m.track_model(&new, 2, Box::new(|| 0), Vec::new(), 1, 1);
        new.observe_inference(Duration::from_millis(1), Some(0.95), ErrorType::None, None);
        new.batch_size.observe(1.0);
        let text = m.encode();
        assert!(text.contains(&format!("{qps_line} 1")), "{text}");
        assert!(
            text.contains("ai_inference_batch_size_count{model_name=\"m\",model_version=\"1\"} 1"),
            "{text}"
        );
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
