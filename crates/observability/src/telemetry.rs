//! Logs and traces, set up in one place.
//!
//! - Logs: env-filtered, text or JSON; JSON lines carry the `trace_id` and `span_id`
//!   of the request span they were written under.
//! - Traces: OpenTelemetry spans through `tracing-opentelemetry`. A tracer provider is
//!   always installed so every request has W3C trace ids (for logs and metric
//!   exemplars); spans leave the process only when an OTLP endpoint is configured.
//! - Sampling: parent-based; a root span is sampled by the ratio of the first route
//!   prefix its name matches, or the default ratio.
//! - Propagation: W3C `traceparent` / `tracestate`, extracted from HTTP headers and
//!   gRPC metadata (both are HTTP/2 headers here) and injected into outgoing calls.
//! - Cost: request spans are built only when they go somewhere: to an exporter, or
//!   into JSON logs that print their ids ([`spans_enabled`]). Otherwise a request
//!   only keeps its caller's trace id (from `traceparent`), in a task-local, so
//!   latency exemplars still point at the caller's trace.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{Link, SpanKind, TraceContextExt, TraceId, TracerProvider as _},
    Context, KeyValue,
};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{Sampler, SamplingResult, SdkTracerProvider, ShouldSample},
    Resource,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{filter::FilterExt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

/// The module that opens the per-request server spans (`lattice_server::observe`).
pub const EDGE_TARGET: &str = "lattice_server::observe";

/// Set once by [`init`]; off until then (no subscriber, no spans to build).
static SPANS: AtomicBool = AtomicBool::new(false);
/// Whether JSON logs print span ids, so request spans must carry them as fields.
static SPAN_ID_FIELDS: AtomicBool = AtomicBool::new(false);

tokio::task_local! {
    /// The caller's trace id while spans are off (see the module docs).
    static CALLER_TRACE: Option<String>;
}

/// Whether request spans are worth building: an exporter receives them or JSON logs
/// print their ids. Edges check this before opening a span.
pub fn spans_enabled() -> bool {
    SPANS.load(Ordering::Relaxed)
}

#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// EnvFilter directives, e.g. "info,lattice_inference=debug".
    pub filter: String,
    pub json_logs: bool,
    /// OTLP/gRPC collector endpoint, e.g. "http://127.0.0.1:4317"; `None` keeps spans local.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// Ratio of root spans sampled when no route rule matches.
    pub sample_ratio: f64,
    /// (span-name substring, ratio), first match wins; e.g. ("/v2/health", 0.0).
    pub route_sample_ratios: Vec<(String, f64)>,
}

/// Flushes and stops the exporter when dropped.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Exports every finished span now (tests, and before exit).
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

#[derive(Clone, Debug)]
struct RouteSampler {
    default: Sampler,
    routes: Vec<(String, Sampler)>,
}

impl ShouldSample for RouteSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let sampler = self
            .routes
            .iter()
            .find(|(route, _)| name.contains(route.as_str()))
            .map_or(&self.default, |(_, s)| s);
        sampler.should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// Why logging or tracing could not be set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TelemetryError {
    Filter { filter: String, reason: String },
    Exporter { endpoint: String, reason: String },
    AlreadyInitialised(String),
}

impl std::fmt::Display for TelemetryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TelemetryError::Filter { filter, reason } => write!(f, "invalid log filter '{filter}': {reason}"),
            TelemetryError::Exporter { endpoint, reason } => write!(f, "OTLP exporter for {endpoint}: {reason}"),
            TelemetryError::AlreadyInitialised(e) => write!(f, "tracing already initialised: {e}"),
        }
    }
}

impl std::error::Error for TelemetryError {}

/// Builds the tracer provider (and its exporter, when configured).
pub fn tracer_provider(cfg: &TelemetryConfig) -> Result<SdkTracerProvider, TelemetryError> {
    // With nowhere to send spans, recording them is pure cost: spans stay
    // non-recording but still carry valid W3C ids for logs, exemplars and
    // propagation.
    let sampler = if cfg.otlp_endpoint.is_none() {
        Sampler::AlwaysOff
    } else {
        Sampler::ParentBased(Box::new(RouteSampler {
            default: Sampler::TraceIdRatioBased(cfg.sample_ratio),
            routes: cfg
                .route_sample_ratios
                .iter()
                .map(|(r, ratio)| (r.clone(), Sampler::TraceIdRatioBased(*ratio)))
                .collect(),
        }))
    };
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(Resource::builder().with_service_name(cfg.service_name.clone()).build());
    if let Some(endpoint) = &cfg.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| TelemetryError::Exporter {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            })?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// Installs the global subscriber. Call once, at start-up, inside the runtime.
pub fn init(cfg: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&cfg.filter).map_err(|e| TelemetryError::Filter {
        filter: cfg.filter.clone(),
        reason: e.to_string(),
    })?;
    let provider = tracer_provider(cfg)?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // The log filter applies to log output only: request spans are traced whatever
    // the log level says.
    // Without an exporter only the edge's request spans are needed (their ids go into
    // logs, exemplars and onward propagation); inner spans would be built for nothing.
    let exporting = cfg.otlp_endpoint.is_some();
    // Per-span extras off: source location, thread, target and busy/idle timing
    // (an Instant read at every poll) add attributes nobody queries, and context
    // activation at every poll serves only libraries that read the ambient OpenTelemetry
    // context, which nothing here does. Together they cost more than the span.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("lattice"))
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(tracing_subscriber::filter::filter_fn(move |meta| {
            *meta.level() <= tracing::Level::INFO && (exporting || meta.target().starts_with(EDGE_TARGET))
        }));
    let fmt = if cfg.json_logs {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        // Text lines carry events only: formatting every request span's fields for a
        // line that is seldom written was the largest part of a span's cost. JSON logs
        // are the ones that carry a request's trace_id and span_id (and the ones where
        // span-scoped filter directives apply).
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter.and(tracing_subscriber::filter::filter_fn(|meta| !meta.is_span())))
            .boxed()
    };
    tracing_subscriber::registry()
        .with(otel)
        .with(fmt)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInitialised(e.to_string()))?;
    SPANS.store(exporting || cfg.json_logs, Ordering::Relaxed);
    SPAN_ID_FIELDS.store(cfg.json_logs, Ordering::Relaxed);
    Ok(TelemetryGuard { provider })
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The remote parent carried by `traceparent` / `tracestate` headers, if any.
pub fn extract(headers: &http::HeaderMap) -> Context {
    if !headers.contains_key("traceparent") {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes the current span's context as `traceparent` / `tracestate` headers, so the
/// next hop continues the trace.
pub fn inject_current(headers: &mut http::HeaderMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// The remote parent a `traceparent` value names (agent frames carry it in their
/// envelope rather than in headers).
pub fn context_from_traceparent(traceparent: &str) -> Context {
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(traceparent) {
        headers.insert("traceparent", v);
    }
    extract(&headers)
}

/// `span`'s W3C `traceparent`, or "" when tracing is off, for the next hop's frame.
pub fn traceparent_of(span: &tracing::Span) -> String {
    let cx = span.context();
    let mut headers = http::HeaderMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut headers));
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Makes `span` a child of the remote context (when valid) and, when JSON logs print
/// them, records its W3C ids as the span fields `trace_id` and `span_id`.
pub fn adopt(span: &tracing::Span, remote: Context) {
    if remote.span().span_context().is_valid() {
        let _ = span.set_parent(remote);
    }
    if !SPAN_ID_FIELDS.load(Ordering::Relaxed) {
        return;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
        span.record("span_id", tracing::field::display(sc.span_id()));
    }
}

/// The trace id of the caller's valid `traceparent`, if it sent one.
pub fn caller_trace_id(headers: &http::HeaderMap) -> Option<String> {
    if !headers.contains_key("traceparent") {
        return None;
    }
    let sc = extract(headers).span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Runs `fut` with `trace_id` as the caller's trace (used while spans are off).
pub async fn with_caller_trace<F: std::future::Future>(trace_id: Option<String>, fut: F) -> F::Output {
    CALLER_TRACE.scope(trace_id, fut).await
}

/// Trace id of the current request: its span's when spans are on, else the caller's.
pub fn current_trace_id() -> Option<String> {
    if !spans_enabled() {
        return CALLER_TRACE.try_with(Clone::clone).ok().flatten();
    }
    trace_id_of(&tracing::Span::current())
}

/// The W3C trace id `span` belongs to, if it has a valid one.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
