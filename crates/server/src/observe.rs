//! Request-level observability at the edge: one span per request (continuing the
//! caller's W3C trace when `traceparent` is present) and the request counters and
//! duration histograms, for REST (an axum middleware) and gRPC (a tower layer).

use std::{
    borrow::Cow,
    collections::HashSet,
    sync::{Arc, LazyLock},
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};
use futures::future::BoxFuture;
use lattice_observability::{metrics::TraceLabel, telemetry};
use parking_lot::RwLock;
use tracing::{field::Empty, Instrument};

use crate::edge_metrics::{EdgeMetrics, RequestLabels, RouteLabels};

use crate::AppState;

/// axum middleware for the REST port.
pub async fn http(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !state.cfg.telemetry {
        return next.run(req).await;
    }
    let route = Cow::Borrowed(
        req.extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", |p| ROUTES.intern(p.as_str())),
    );
    let method = http_method(req.method());
    let started = Instant::now();
    let (resp, trace_id) = if telemetry::spans_enabled() {
        let span = tracing::info_span!(
            "http.request",
            otel.name = %format!("{method} {route}"),
            otel.kind = "server",
            http.request.method = %method,
            http.route = %route,
            http.response.status_code = Empty,
            trace_id = Empty,
            span_id = Empty,
        );
        telemetry::adopt(&span, telemetry::extract(req.headers()));
        let resp = next.run(req).instrument(span.clone()).await;
        let status = resp.status().as_u16();
        span.record("http.response.status_code", status);
        // An access log line at debug level; under the span, so JSON logs carry its ids.
        tracing::debug!(parent: &span, status, elapsed_us = started.elapsed().as_micros() as u64, "request served");
        (resp, telemetry::trace_id_of(&span))
    } else {
        let caller = telemetry::caller_trace_id(req.headers());
        (
            telemetry::with_caller_trace(caller.clone(), next.run(req)).await,
            caller,
        )
    };
    let o = Observed {
        protocol: "http",
        method,
        route,
        status_code: resp.status().as_u16(),
        started,
        trace_id,
    };
    record(&state.edge, o);
    resp
}

/// Label values seen at the edge, leaked once each so recording a request borrows
/// them instead of allocating. Bounded: past `cap` distinct values, new ones are
/// recorded as `other`, so the leak and the metric families stay small.
struct Interner {
    set: LazyLock<RwLock<HashSet<&'static str>>>,
    cap: usize,
}

impl Interner {
    const fn new(cap: usize) -> Interner {
        Interner {
            set: LazyLock::new(Default::default),
            cap,
        }
    }

    /// The interned value, if `s` was interned before.
    fn get(&self, s: &str) -> Option<&'static str> {
        self.set.read().get(s).copied()
    }

    fn intern(&self, s: &str) -> &'static str {
        if let Some(v) = self.set.read().get(s) {
            return v;
        }
        let mut set = self.set.write();
        if let Some(v) = set.get(s) {
            return v;
        }
        if set.len() >= self.cap {
            return "other";
        }
        let v: &'static str = Box::leak(s.to_owned().into_boxed_str());
        set.insert(v);
        v
    }
}

/// The router's matched templates: a fixed, small set.
static ROUTES: Interner = Interner::new(256);
/// Paths under the gRPC services served here. A client can name any method of a
/// served service, so these have their own cap: made-up names cannot crowd out
/// the REST routes, whose names per-route sampling matches.
static GRPC_PATHS: Interner = Interner::new(256);

/// The method label: the standard methods, and `other` for anything a client makes
/// up (each new value would otherwise be a new series).
fn http_method(m: &http::Method) -> Cow<'static, str> {
    const KNOWN: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    Cow::Borrowed(KNOWN.iter().find(|k| **k == m.as_str()).copied().unwrap_or("other"))
}

/// One finished request, as the edge metrics record it.
struct Observed {
    protocol: &'static str,
    method: Cow<'static, str>,
    route: Cow<'static, str>,
    status_code: u16,
    started: Instant,
    /// The request's trace, as the duration histogram's exemplar.
    trace_id: Option<String>,
}

fn record(metrics: &EdgeMetrics, o: Observed) {
    let Observed {
        protocol,
        method,
        route,
        status_code,
        started,
        trace_id,
    } = o;
    metrics
        .http_request_duration
        .get_or_create(&RouteLabels {
            protocol: Cow::Borrowed(protocol),
            route,
            method: method.clone(),
        })
        .observe(
            started.elapsed().as_secs_f64(),
            trace_id.map(|trace_id| TraceLabel { trace_id }),
            None,
        );
    metrics
        .http_requests
        .get_or_create(&RequestLabels {
            protocol: Cow::Borrowed(protocol),
            method,
            status_code,
        })
        .inc();
}

/// gRPC services this server answers (path prefixes).
const SERVICES: &[&str] = &[
    "/inference.GRPCInferenceService",
    "/grpc.health.v1.Health",
    "/grpc.reflection.v1.ServerReflection",
    "/externalscaler.ExternalScaler",
    "/lattice.agent.v1.AgentCoordination",
    "/lattice.agent.v1.Chat",
];

/// tower layer for the gRPC server.
#[derive(Clone)]
pub struct GrpcLayer {
    pub metrics: Arc<EdgeMetrics>,
    pub enabled: bool,
}

impl<S> tower::Layer<S> for GrpcLayer {
    type Service = GrpcObserve<S>;

    fn layer(&self, inner: S) -> GrpcObserve<S> {
        GrpcObserve {
            inner,
            metrics: self.metrics.clone(),
            enabled: self.enabled,
        }
    }
}

#[derive(Clone)]
pub struct GrpcObserve<S> {
    inner: S,
    metrics: Arc<EdgeMetrics>,
    enabled: bool,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcObserve<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The clone that was driven to readiness serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !self.enabled {
            return Box::pin(inner.call(req));
        }
        let metrics = self.metrics.clone();
        // Paths are client-chosen: only methods of the services served here become
        // label values, and a new one only once it was answered (a made-up method
        // of a served service is UNIMPLEMENTED), so a scan of made-up names cannot
        // grow the metric families.
        let raw = req.uri().path();
        let served = SERVICES
            .iter()
            .any(|s| raw.strip_prefix(s).is_some_and(|m| m.starts_with('/')));
        let known = if served { GRPC_PATHS.get(raw) } else { None };
        let unseen = (served && known.is_none()).then(|| raw.to_string());
        // A span when spans go somewhere; otherwise only the caller's trace id.
        let (span, caller) = if telemetry::spans_enabled() {
            let name = known.map_or_else(|| Cow::Owned(raw.to_string()), Cow::Borrowed);
            let span = tracing::info_span!(
                "grpc.request",
                otel.name = %name,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.method = %name.rsplit('/').next().unwrap_or_default(),
                rpc.grpc.status_code = Empty,
                trace_id = Empty,
                span_id = Empty,
            );
            telemetry::adopt(&span, telemetry::extract(req.headers()));
            (Some(span), None)
        } else {
            (None, telemetry::caller_trace_id(req.headers()))
        };
        let call = inner.call(req);
        Box::pin(async move {
            let started = Instant::now();
            let (result, trace_id) = match span {
                Some(span) => {
                    let result = call.instrument(span.clone()).await;
                    span.record("rpc.grpc.status_code", grpc_code(&result));
                    (result, telemetry::trace_id_of(&span))
                }
                None => (telemetry::with_caller_trace(caller.clone(), call).await, caller),
            };
            let status_code = grpc_code(&result);
            let path: &'static str = match (known, unseen) {
                (Some(p), _) => p,
                (None, Some(raw)) if status_code != UNIMPLEMENTED => GRPC_PATHS.intern(&raw),
                (None, Some(_)) => "other",
                (None, None) => "unknown",
            };
            let o = Observed {
                protocol: "grpc",
                method: Cow::Borrowed(path.rsplit('/').next().unwrap_or_default()),
                route: Cow::Borrowed(path),
                status_code,
                started,
                trace_id,
            };
            record(&metrics, o);
            result
        })
    }
}

/// gRPC's code for a method the server does not have.
const UNIMPLEMENTED: u16 = 12;

/// The call's gRPC status code. A failed call is answered trailers-only, so its status
/// is a header; a successful one puts grpc-status 0 in the trailers.
fn grpc_code<RB, E>(result: &Result<http::Response<RB>, E>) -> u16 {
    match result {
        Ok(r) => r
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        Err(_) => 13,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_labels_are_shared_and_bounded() {
        let first = ROUTES.intern("/v2/models/{model}/infer");
        assert!(
            std::ptr::eq(first, ROUTES.intern("/v2/models/{model}/infer")),
            "leaked once, then reused"
        );
        let names: Vec<String> = (0..=GRPC_PATHS.cap)
            .map(|i| format!("/inference.GRPCInferenceService/Made{i}"))
            .collect();
        let interned: Vec<&'static str> = names.iter().map(|n| GRPC_PATHS.intern(n)).collect();
        assert_eq!(interned.last(), Some(&"other"), "past the cap, new values collapse");
        assert_eq!(
            ROUTES.intern("/v2/health/ready"),
            "/v2/health/ready",
            "a full gRPC set does not crowd out routes"
        );
    }
}
