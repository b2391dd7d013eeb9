//! The gateway: one tower layer in front of every service on the REST and gRPC
//! ports that authenticates ([`crate::auth`]), applies the tenant's limits
//! ([`crate::limit`]), hands the request's context (tenant, user, deployment tag) to
//! the handlers, and writes one audit record per request ([`crate::audit`]).
//!
//! The same layer runs on both ports, so one rule holds for REST, gRPC inference,
//! the repository API, agent streams, Chat and REST tasks. Health (REST
//! `/v2/health/*`, gRPC `grpc.health.v1`, `ServerLive`, `ServerReady`) and KEDA's
//! external scaler (load numbers only, like the metrics port) stay open and are not
//! audited. After the check the layer overwrites `x-tenant` and `x-tenant-id` with
//! the verified tenant, so everything behind it (limits, the orchestrator, task
//! sessions) keys on a tenant the caller has proven.

pub mod policy;

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use lattice_observability::Metrics;

use crate::edge_metrics::{EdgeMetrics, RefusalLabels};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::{
    audit::{self, AuditConfig, AuditLog, Record},
    auth::{self, AuthConfig, AuthStartError, Authenticator, Scope},
    error::ApiError,
    limit::{Limiter, Permit, Reason},
    watch::{load_and_watch, WatchError, Watched},
};

pub const DEPLOYMENT_TAG_HEADER: &str = "x-deployment-tag";
/// With authentication off, the sticky key of canary routing may be given here.
pub const USER_ID_HEADER: &str = "x-user-id";

#[derive(Clone, Debug, Default)]
pub struct GatewayConfig {
    /// `None`: authentication off (local use only); every request is the tenant its
    /// `x-tenant-id` (or `x-tenant`) names, `default` without one.
    pub auth: Option<AuthConfig>,
    /// Per-tenant limits and canary rules, re-read on change.
    pub policy: Option<std::path::PathBuf>,
    /// The two buckets and the concurrency cap per tenant.
    pub limits: bool,
    pub audit: Option<AuditConfig>,
}

pub struct Gateway {
    auth: Option<Authenticator>,
    policy: Arc<Watched<policy::Policy>>,
    limiter: Option<Limiter>,
    audit: Option<AuditLog>,
    metrics: Arc<EdgeMetrics>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("auth", &self.auth.is_some())
            .field("limits", &self.limiter.is_some())
            .field("audit", &self.audit.is_some())
            .finish()
    }
}

/// What the handlers learn about a request from the gateway (request extension).
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub tenant: String,
    pub user: String,
    pub deployment_tag: Option<String>,
    /// The model and version that answered, noted by the handler for the audit record.
    note: Arc<Mutex<Option<(String, String)>>>,
}

impl RequestContext {
    pub fn note_model(&self, model: &str, version: &str) {
        *self.note.lock() = Some((model.to_string(), version.to_string()));
    }
}

/// Which port the layer guards: refusals are JSON there, gRPC statuses here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

/// What a path needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Open,
    /// Any valid credential.
    Authenticated,
    Scope(Scope),
}

fn classify(proto: Protocol, path: &str) -> Access {
    match proto {
        Protocol::Http => {
            if path.starts_with("/v2/health/") {
                Access::Open
            } else if path.starts_with("/v2/repository/")
                || path.starts_with("/v2/systemsharedmemory")
                || path.starts_with("/v2/cudasharedmemory")
            {
                // Registering a region makes the server open files on its host.
                Access::Scope(Scope::Admin)
            } else if path.starts_with("/v1/agents/") || path == "/v1/tools" {
                Access::Scope(Scope::Agent)
            } else if path == "/metrics" || path.ends_with("/stats") {
                Access::Scope(Scope::Metrics)
            } else if path == "/v2" || path.starts_with("/v2/models/") {
                Access::Scope(Scope::Infer)
            } else {
                Access::Authenticated
            }
        }
        Protocol::Grpc => {
            let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
            match service {
                "grpc.health.v1.Health" | "externalscaler.ExternalScaler" => Access::Open,
                "inference.GRPCInferenceService" => match method {
                    "ServerLive" | "ServerReady" => Access::Open,
                    "RepositoryIndex" | "RepositoryModelLoad" | "RepositoryModelUnload" => Access::Scope(Scope::Admin),
                    m if m.starts_with("SystemSharedMemory") || m.starts_with("CudaSharedMemory") => {
                        Access::Scope(Scope::Admin)
                    }
                    "ModelStatistics" => Access::Scope(Scope::Metrics),
                    _ => Access::Scope(Scope::Infer),
                },
                s if s.starts_with("lattice.agent.") => Access::Scope(Scope::Agent),
                _ => Access::Authenticated,
            }
        }
    }
}

/// Why the gateway could not start (a start-up error: bad key or policy files, an
/// audit sink out of reach).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Auth(#[from] AuthStartError),
    #[error(transparent)]
    Policy(#[from] WatchError),
    #[error(transparent)]
    Audit(#[from] audit::AuditStartError),
}

impl Gateway {
    pub async fn start(
        cfg: &GatewayConfig,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Result<Gateway, GatewayError> {
        let auth = cfg
            .auth
            .as_ref()
            .map(|a| Authenticator::start(a, stop.clone()))
            .transpose()?;
        let policy = match &cfg.policy {
            Some(p) => load_and_watch(p, policy::Policy::parse, stop.clone())?,
            None => Watched::new(policy::Policy::default()),
        };
        let audit = match &cfg.audit {
            Some(a) => Some(audit::start(a, &metrics, stop).await?),
            None => None,
        };
        Ok(Gateway {
            auth,
            policy,
            limiter: cfg.limits.then(Limiter::new),
            audit,
            metrics: metrics.set::<EdgeMetrics>(),
        })
    }

    /// Everything off: what a library user gets without [`Gateway::start`].
    pub fn off(metrics: Arc<Metrics>) -> Gateway {
        Gateway {
            auth: None,
            policy: Watched::new(policy::Policy::default()),
            limiter: None,
            audit: None,
            metrics: metrics.set::<EdgeMetrics>(),
        }
    }

    /// The startup line's summary: `auth=on limits=on audit=file`.
    pub fn describe(&self) -> String {
        format!(
            "auth={} limits={} audit={}",
            if self.auth.is_some() { "on" } else { "OFF" },
            if self.limiter.is_some() { "on" } else { "off" },
            if self.audit.is_some() { "on" } else { "off" },
        )
    }

    pub fn auth_enabled(&self) -> bool {
        self.auth.is_some()
    }

    /// The credential of the server's own hops, when authentication is on.
    pub fn internal_key(&self) -> Option<&str> {
        self.auth.as_ref().map(Authenticator::internal_key)
    }

    pub fn audit(&self) -> Option<&AuditLog> {
        self.audit.as_ref()
    }

    pub fn policy(&self) -> Arc<policy::Policy> {
        self.policy.get()
    }

    /// One token from each of the tenant's buckets, for each request of a stream
    /// the layer already admitted.
    pub fn take_token(&self, tenant: &str) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        let policy = self.policy.get();
        limiter.take(tenant, policy.limits(tenant)).map_err(|r| {
            self.count_refusal(&policy, tenant, r.reason.as_str());
            ApiError::RateLimited {
                tenant: tenant.to_string(),
                retry_after: r.retry_after,
            }
        })
    }

    /// The version a request for `model` goes to: the one it names, else the
    /// canary rule's pick, else the model's default ("").
    pub fn route_version(&self, model: &str, version: &str, ctx: Option<&RequestContext>) -> String {
        if !version.is_empty() {
            return version.to_string();
        }
        let policy = self.policy.get();
        let Some(rule) = policy.canary.get(model) else {
            return String::new();
        };
        let (tag, key) = match ctx {
            Some(c) => (
                c.deployment_tag.as_deref(),
                if c.user.is_empty() {
                    c.tenant.as_str()
                } else {
                    c.user.as_str()
                },
            ),
            None => (None, ""),
        };
        rule.pick(model, tag, key)
    }

    /// Waits until the audit records so far are written.
    pub async fn flush_audit(&self) {
        if let Some(a) = &self.audit {
            a.flush().await;
        }
    }

    fn count_refusal(&self, policy: &policy::Policy, tenant: &str, reason: &'static str) {
        self.metrics
            .gateway_refusals
            .get_or_create(&RefusalLabels {
                tenant: policy.tenant_label(tenant),
                reason,
            })
            .inc();
    }

    pub fn layer(self: &Arc<Self>, protocol: Protocol) -> GatewayLayer {
        GatewayLayer {
            gateway: self.clone(),
            protocol,
        }
    }
}

// === Layer ===

#[derive(Clone)]
pub struct GatewayLayer {
    gateway: Arc<Gateway>,
    protocol: Protocol,
}

impl<S> tower::Layer<S> for GatewayLayer {
    type Service = GatewayService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GatewayService {
            inner,
            gateway: self.gateway.clone(),
            protocol: self.protocol,
        }
    }
}

#[derive(Clone)]
pub struct GatewayService<S> {
    inner: S,
    gateway: Arc<Gateway>,
    protocol: Protocol,
}

/// Request bodies the layer can wrap (to count bytes) and give back as the same type.
pub trait Rebox: HttpBody<Data = Bytes> + Sized + Send + Unpin + 'static {
    fn rebox(b: CountingBody<Self>) -> Self;
}

impl Rebox for axum::body::Body {
    fn rebox(b: CountingBody<Self>) -> Self {
        axum::body::Body::new(b)
    }
}

impl Rebox for tonic::body::Body {
    fn rebox(b: CountingBody<Self>) -> Self {
        tonic::body::Body::new(b)
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<Request<B>> for GatewayService<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Rebox,
    B::Error: Into<tower::BoxError>,
    RB: HttpBody<Data = Bytes> + Send + 'static,
    RB::Error: Into<tower::BoxError>,
{
    type Response = Response<GatewayBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let access = classify(self.protocol, req.uri().path());
        // The service that was polled ready answers this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if access == Access::Open {
            return Box::pin(async move {
                let resp = inner.call(req).await?;
                Ok(resp.map(|b| GatewayBody::new(axum::body::Body::new(b), None)))
            });
        }
        let gw = self.gateway.clone();
        let protocol = self.protocol;
        let started = Instant::now();
        let mut pending = PendingRecord::new(&req, protocol);
        let identity = match &gw.auth {
            Some(a) => a.check(
                req.headers(),
                match access {
                    Access::Scope(s) => Some(s),
                    _ => None,
                },
            ),
            None => Ok(anonymous(req.headers())),
        };
        let policy = gw.policy.get();
        let identity = match identity {
            Ok(id) => id,
            Err(e) => {
                let tenant = auth::tenant_header(req.headers()).unwrap_or("").to_string();
                gw.count_refusal(&policy, &tenant, e.reason());
                pending.tenant = tenant;
                return Box::pin(async move { Ok(refuse(&gw, protocol, pending, e.reason(), e.into(), started)) });
            }
        };
        pending.tenant = identity.tenant.clone();
        pending.user = identity.user.clone();
        let permit = match &gw.limiter {
            None => None,
            Some(l) => match l.admit(&identity.tenant, policy.limits(&identity.tenant)) {
                Ok(p) => Some(p),
                Err(r) => {
                    gw.count_refusal(&policy, &identity.tenant, r.reason.as_str());
                    let err = match r.reason {
                        Reason::Concurrency => ApiError::TenantBusy {
                            tenant: identity.tenant.clone(),
                            limit: r.max_concurrent,
                        },
                        Reason::Fast | Reason::Steady => ApiError::RateLimited {
                            tenant: identity.tenant.clone(),
                            retry_after: r.retry_after,
                        },
                    };
                    return Box::pin(
                        async move { Ok(refuse(&gw, protocol, pending, r.reason.as_str(), err, started)) },
                    );
                }
            },
        };
        // Everything behind the layer sees the verified tenant and user (the
        // orchestrator writes them into each task's audit record).
        if let Ok(v) = HeaderValue::from_str(&identity.tenant) {
            req.headers_mut().insert(crate::limit::TENANT_HEADER, v.clone());
            req.headers_mut().insert(auth::TENANT_ID_HEADER, v);
        }
        // The server's own hop (and, with authentication off, anyone, as with
        // x-user-id) may name the user of each task it offers.
        if gw.auth.is_none() || identity.method == "internal" {
            req.headers_mut().insert(
                lattice_agent::orchestrator::DELEGATE_METADATA,
                HeaderValue::from_static("1"),
            );
        } else {
            req.headers_mut().remove(lattice_agent::orchestrator::DELEGATE_METADATA);
        }
        match HeaderValue::from_str(&identity.user) {
            Ok(v) if !identity.user.is_empty() => {
                req.headers_mut().insert(USER_ID_HEADER, v);
            }
            _ => {
                req.headers_mut().remove(USER_ID_HEADER);
            }
        }
        let ctx = RequestContext {
            tenant: identity.tenant,
            user: identity.user,
            deployment_tag: req
                .headers()
                .get(DEPLOYMENT_TAG_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|t| t.len() <= 128)
                .map(str::to_string),
            note: Arc::default(),
        };
        req.extensions_mut().insert(ctx.clone());
        let bytes_in = Arc::new(AtomicU64::new(0));
        let req = if gw.audit.is_some() {
            let counter = bytes_in.clone();
            req.map(|b| {
                B::rebox(CountingBody {
                    inner: b,
                    count: counter,
                })
            })
        } else {
            req
        };
        Box::pin(async move {
            let resp = inner.call(req).await?;
            let audit = gw.audit.clone().map(|log| Finish {
                log,
                pending,
                started,
                bytes_in,
                note: ctx.note,
                status: resp.status().as_u16(),
                grpc_status: grpc_status(resp.headers()),
            });
            let tail = Tail { audit, _permit: permit };
            Ok(resp.map(|b| GatewayBody::new(axum::body::Body::new(b), Some(tail))))
        })
    }
}

/// Without authentication: the tenant the request names (`x-tenant-id`, else the
/// older `x-tenant`), `default` without one; the user from `x-user-id`.
fn anonymous(headers: &HeaderMap) -> auth::Identity {
    let tenant = auth::tenant_header(headers)
        .or_else(|| {
            headers
                .get(crate::limit::TENANT_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|t| !t.is_empty() && t.len() <= auth::MAX_TENANT_LEN)
        })
        .unwrap_or("default");
    let user = headers
        .get(USER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|u| u.len() <= 128)
        .unwrap_or("");
    auth::Identity {
        tenant: tenant.to_string(),
        user: user.to_string(),
        method: "none",
    }
}

fn refuse(
    gw: &Gateway,
    protocol: Protocol,
    mut pending: PendingRecord,
    reason: &'static str,
    err: ApiError,
    started: Instant,
) -> Response<GatewayBody> {
    let resp = match protocol {
        Protocol::Http => axum::response::IntoResponse::into_response(err).map(axum::body::Body::new),
        Protocol::Grpc => tonic::Status::from(err)
            .into_http::<tonic::body::Body>()
            .map(axum::body::Body::new),
    };
    pending.refusal = Some(reason);
    let tail = gw.audit.clone().map(|log| Finish {
        log,
        pending,
        started,
        bytes_in: Arc::new(AtomicU64::new(0)),
        note: Arc::default(),
        status: resp.status().as_u16(),
        grpc_status: grpc_status(resp.headers()),
    });
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        GatewayBody::new(
            body,
            Some(Tail {
                audit: tail,
                _permit: None,
            }),
        ),
    )
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

// === Audit record assembly ===

/// What is known of a request before it is answered.
struct PendingRecord {
    protocol: Protocol,
    api: String,
    client_ip: Option<String>,
    tenant: String,
    user: String,
    refusal: Option<&'static str>,
    headers: BTreeMap<String, String>,
    content_length: Option<u64>,
}

/// Request headers worth keeping in a record (never a credential's value).
const KEPT_HEADERS: [&str; 6] = [
    "user-agent",
    "content-type",
    "x-request-id",
    "x-tenant-id",
    DEPLOYMENT_TAG_HEADER,
    "traceparent",
];

impl PendingRecord {
    fn new<B>(req: &Request<B>, protocol: Protocol) -> PendingRecord {
        let h = req.headers();
        let mut headers = BTreeMap::new();
        for name in KEPT_HEADERS {
            if let Some(v) = h.get(name).and_then(|v| v.to_str().ok()) {
                headers.insert(name.to_string(), auth::clip(v));
            }
        }
        let credential = match (h.get(http::header::AUTHORIZATION), h.get(auth::API_KEY_HEADER)) {
            (Some(_), _) => "bearer",
            (None, Some(_)) => "api-key",
            (None, None) => "none",
        };
        headers.insert("credential".into(), credential.into());
        let client_ip = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|c| c.remote_addr())
            .or_else(|| {
                req.extensions()
                    .get::<axum::extract::ConnectInfo<SocketAddr>>()
                    .map(|c| c.0)
            })
            .map(|a| a.ip().to_string());
        PendingRecord {
            protocol,
            api: auth::clip(req.uri().path()),
            client_ip,
            tenant: String::new(),
            user: String::new(),
            refusal: None,
            headers,
            content_length: h
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        }
    }
}

struct Finish {
    log: AuditLog,
    pending: PendingRecord,
    started: Instant,
    bytes_in: Arc<AtomicU64>,
    note: Arc<Mutex<Option<(String, String)>>>,
    status: u16,
    grpc_status: Option<i32>,
}

impl Finish {
    fn emit(self, bytes_out: u64, trailer_status: Option<i32>, complete: bool) {
        let p = self.pending;
        let ts_ms = audit::now_ms();
        let (grpc_status, status) = match p.protocol {
            Protocol::Grpc => {
                // No grpc-status by the end: the client left first (CANCELLED).
                let code = self
                    .grpc_status
                    .or(trailer_status)
                    .unwrap_or(if complete { 2 } else { 1 });
                (Some(code), audit::grpc_to_http(code))
            }
            Protocol::Http => (None, if complete { self.status } else { 499 }),
        };
        let (model, version) = match self.note.lock().take() {
            Some((m, v)) => (Some(m), Some(v)),
            None => (None, None),
        };
        let counted = self.bytes_in.load(Ordering::Relaxed);
        self.log.record(Record {
            request_id: uuid::Uuid::now_v7().to_string(),
            time: audit::rfc3339(ts_ms),
            ts_ms,
            client_ip: p.client_ip,
            tenant_id: p.tenant,
            user_id: p.user,
            protocol: match p.protocol {
                Protocol::Http => "http".into(),
                Protocol::Grpc => "grpc".into(),
            },
            api: p.api,
            model,
            version,
            status,
            grpc_status,
            response_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            bytes_in: if counted > 0 {
                counted
            } else {
                p.content_length.unwrap_or(0)
            },
            bytes_out,
            refusal: p.refusal.map(str::to_string),
            headers: p.headers,
            task_id: None,
            capability: None,
        });
    }
}

/// What the response body carries to its end: the audit record to finish and the
/// tenant's concurrency slot (a stream holds it while open).
struct Tail {
    audit: Option<Finish>,
    _permit: Option<Permit>,
}

// === Bodies ===

/// A request body that counts the bytes read through it.
pub struct CountingBody<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for CountingBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body: the inner one, counted; its end (or drop, when the client
/// leaves) writes the audit record and frees the concurrency slot.
pub struct GatewayBody {
    inner: axum::body::Body,
    tail: Option<Tail>,
    bytes: u64,
    trailer_status: Option<i32>,
}

impl GatewayBody {
    fn new(inner: axum::body::Body, tail: Option<Tail>) -> GatewayBody {
        GatewayBody {
            inner,
            tail,
            bytes: 0,
            trailer_status: None,
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(tail) = self.tail.take() {
            if let Some(f) = tail.audit {
                f.emit(self.bytes, self.trailer_status, complete);
            }
        }
    }
}

impl HttpBody for GatewayBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    self.trailer_status = grpc_status(t);
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GatewayBody {
    fn drop(&mut self) {
        // An empty body may never be polled; it is complete all the same.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_is_classified() {
        use Access::*;
        use Protocol::*;
        for (p, path, want) in [
            (Http, "/v2/health/ready", Open),
            (Http, "/v2/models/m/infer", Scope(crate::auth::Scope::Infer)),
            (Http, "/v2/models/m/versions/2/infer", Scope(crate::auth::Scope::Infer)),
            (Http, "/v2/repository/models/m/load", Scope(crate::auth::Scope::Admin)),
            (
                Http,
                "/v2/systemsharedmemory/region/r/register",
                Scope(crate::auth::Scope::Admin),
            ),
            (Http, "/v2/cudasharedmemory/status", Scope(crate::auth::Scope::Admin)),
            (Http, "/v1/agents/tasks", Scope(crate::auth::Scope::Agent)),
            (Http, "/v1/tools", Scope(crate::auth::Scope::Agent)),
            (Http, "/metrics", Scope(crate::auth::Scope::Metrics)),
            (Http, "/v2/models/m/stats", Scope(crate::auth::Scope::Metrics)),
            (Http, "/nope", Authenticated),
            (Grpc, "/grpc.health.v1.Health/Check", Open),
            (Grpc, "/inference.GRPCInferenceService/ServerLive", Open),
            (
                Grpc,
                "/inference.GRPCInferenceService/ModelInfer",
                Scope(crate::auth::Scope::Infer),
            ),
            (
                Grpc,
                "/inference.GRPCInferenceService/RepositoryModelLoad",
                Scope(crate::auth::Scope::Admin),
            ),
            (
                Grpc,
                "/inference.GRPCInferenceService/ModelStatistics",
                Scope(crate::auth::Scope::Metrics),
            ),
            (
                Grpc,
                "/lattice.agent.v1.AgentCoordination/NegotiateTask",
                Scope(crate::auth::Scope::Agent),
            ),
            (Grpc, "/lattice.agent.v1.Chat/Chat", Scope(crate::auth::Scope::Agent)),
            (
                Grpc,
                "/lattice.agent.v1.ToolCatalog/ListTools",
                Scope(crate::auth::Scope::Agent),
            ),
            (
                Grpc,
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Authenticated,
            ),
        ] {
            assert_eq!(classify(p, path), want, "{p:?} {path}");
        }
    }
}
