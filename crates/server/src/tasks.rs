//! The REST front door of the agent plane: `POST /v1/agents/tasks` offers one task
//! and answers with its result.
//!
//! The handler is a requester agent like any other: it holds one session per tenant
//! and user on the orchestrator's gRPC stream (`AgentCoordination.NegotiateTask`) and
//! offers tasks there, so a REST call takes the same path as a task from a gRPC agent:
//! priority lanes, credits, retries, resend and dedupe across reconnects. The
//! orchestrator is this process's own gRPC service, reached over an in-process
//! connection (no socket, no TLS); the hop is a real gRPC call, which is what lets
//! the trace of a REST request continue into the agents (REST span →
//! `agent.offer` → orchestrator `agent.task` → worker `agent.run` → `tool.call`).
//!
//! Body: `{"capability", "tool", "arguments"?, "priority"? (0..=5 or a name),
//! "timeout_ms"?, "task_id"?}` for the built-in tool-running worker, or
//! `{"capability", "payload", ...}` with any JSON `payload`, which reaches a worker
//! of that capability as offered (serialised JSON). A caller-chosen `task_id` makes a
//! retried request the same task: it does not run again, and a retry after this
//! process restarted, or on another replica sharing its Redis store, gets the
//! stored result at once or the task's result when it finishes (the orchestrator
//! finds the held task through the store and moves it to the new session of the
//! same tenant and user); workers key their side effects by it.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, State},
    http::HeaderMap,
    Json,
};
use lattice_agent::{
    client::{AgentClient, ClientConfig, Event, SendOptions},
    wire,
};
use lattice_observability::telemetry;
use lattice_proto::agent::{agent_message, agent_response, Cancel, TaskOffer, TaskResult};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tonic::Code;

use crate::{error::ApiError, AppState};
use lattice_agent::orchestrator::ON_BEHALF_OF_METADATA;

/// Tenant and user pairs with a live session at once; each costs one stream to the orchestrator.
const MAX_TENANT_SESSIONS: usize = 256;
/// Time a task may take when the request does not say.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `timeout_ms` accepted.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The endpoint name of the in-process connection to this server's gRPC service.
pub const LOCAL_ENDPOINT: &str = "http://in-process.local";

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Outcome>>>>;

enum Outcome {
    Done(TaskResult),
    /// The session that had accepted the offer was lost; the result will not come.
    Lost,
}

/// One requester session per tenant and user (the session names the user the
/// gateway verified, for the audit records of its tasks), opened on first use and
/// closed once idle.
pub struct TaskGateway {
    endpoints: Vec<String>,
    token: Option<String>,
    /// Set, sessions reach the orchestrator in-process rather than over the network.
    connector: Option<lattice_agent::client::Connector>,
    /// A session with no task waiting for this long is closed, so tenants that come
    /// and go cannot fill the table for good.
    idle: Duration,
    sessions: Mutex<HashMap<String, Arc<TenantRequester>>>,
}

struct TenantRequester {
    client: AgentClient,
    waiting: Waiters,
    /// When a request last started or stopped waiting on the session.
    used: Arc<Mutex<Instant>>,
}

impl TenantRequester {
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        self.waiting
            .lock()
            .is_empty()
            .then(|| now.saturating_duration_since(*self.used.lock()))
    }
}

impl TaskGateway {
    /// `endpoints`: orchestrator URLs; `token`: the bearer token agent streams carry;
    /// `idle`: how long a session without waiting tasks is kept.
    pub fn new(endpoints: Vec<String>, token: Option<String>, idle: Duration) -> TaskGateway {
        TaskGateway {
            endpoints,
            token,
            connector: None,
            idle,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Sessions open their streams with `connector` (an in-process connection to
    /// this server's gRPC service) instead of dialling the endpoints.
    pub fn with_connector(mut self, connector: lattice_agent::client::Connector) -> TaskGateway {
        self.connector = Some(connector);
        self
    }

    /// Tenant and user pairs with an open session (tests and the hostile-client suite read it).
    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// The session of `tenant`'s `user` (the caller the gateway verified; its
    /// tasks' audit records name it).
    fn session(&self, tenant: &str, user: &str) -> Result<Arc<TenantRequester>, ApiError> {
        let now = Instant::now();
        // A header value holds no newline, so the key is unambiguous.
        let key = format!("{tenant}\n{user}");
        let mut sessions = self.sessions.lock();
        if let Some(s) = sessions.get(&key) {
            *s.used.lock() = now;
            return Ok(s.clone());
        }
        if sessions.len() >= MAX_TENANT_SESSIONS {
            self.evict_idle(&mut sessions, now);
        }
        if sessions.len() >= MAX_TENANT_SESSIONS {
            // Honest: the soonest any session can become idle long enough is a
            // full idle period away (none is idle enough now).
            let soonest = sessions
                .values()
                .filter_map(|s| s.idle_for(now))
                .max()
                .map_or(self.idle, |idle| self.idle.saturating_sub(idle));
            return Err(ApiError::TaskSessionsFull {
                limit: MAX_TENANT_SESSIONS,
                retry_after: soonest.max(Duration::from_secs(1)),
            });
        }
        let (client, mut events) = AgentClient::connect(ClientConfig {
            endpoints: self.endpoints.clone(),
            connector: self.connector.clone(),
            agent_id: format!(
                "rest-{}-{}",
                lattice_inference::repository::echo(tenant),
                uuid::Uuid::new_v4()
            ),
            tenant: tenant.to_string(),
            auth_token: self.token.clone(),
            // The gateway in front of the orchestrator checks the tenant; the user
            // is taken from this hop only when it is the server's own.
            metadata: vec![
                (crate::auth::TENANT_ID_HEADER.to_string(), tenant.to_string()),
                (ON_BEHALF_OF_METADATA.to_string(), user.to_string()),
            ],
            ..ClientConfig::default()
        });
        let waiting: Waiters = Arc::default();
        let used = Arc::new(Mutex::new(now));
        let pump = waiting.clone();
        let pump_used = used.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                let (task_id, outcome) = match ev {
                    Event::Frame(f) => match f.body {
                        Some(agent_response::Body::Result(r)) => (r.task_id.clone(), Outcome::Done(r)),
                        _ => continue,
                    },
                    Event::Lost { task_id } => (task_id, Outcome::Lost),
                    // The client moves to another replica by itself.
                    Event::Drain(_) => continue,
                };
                if let Some(tx) = pump.lock().remove(&task_id) {
                    *pump_used.lock() = Instant::now();
                    let _ = tx.send(outcome);
                }
            }
        });
        let session = Arc::new(TenantRequester { client, waiting, used });
        sessions.insert(key, session.clone());
        Ok(session)
    }

    /// Closes idle sessions every half idle period until `stop`.
    pub fn start_sweeper(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let me = Arc::downgrade(self);
        let period = (self.idle / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(period) => {}
                    () = stop.cancelled() => return,
                }
                let Some(gw) = me.upgrade() else { return };
                let mut sessions = gw.sessions.lock();
                gw.evict_idle(&mut sessions, Instant::now());
            }
        });
    }

    /// Closes the sessions that have waited on nothing for the idle period.
    fn evict_idle(&self, sessions: &mut HashMap<String, Arc<TenantRequester>>, now: Instant) {
        sessions.retain(|_, s| {
            let keep = s.idle_for(now).is_none_or(|idle| idle < self.idle);
            if !keep {
                let s = s.clone();
                // A goodbye ends the orchestrator's side of the session at once.
                tokio::spawn(async move { s.client.close(false).await });
            }
            keep
        });
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OfferBody {
    capability: String,
    #[serde(default)]
    tool: Option<String>,
    #[serde(default)]
    arguments: Option<Value>,
    /// Any JSON, handed to the worker as offered; instead of `tool`/`arguments`.
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    priority: Option<Value>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    task_id: Option<String>,
}

const PRIORITIES: [&str; 6] = ["background", "low", "normal", "high", "urgent", "realtime"];

fn priority(v: Option<&Value>) -> Result<i32, ApiError> {
    let bad = || ApiError::Malformed(format!("priority must be 0..=5 or one of {}", PRIORITIES.join(", ")));
    match v {
        None => Ok(2),
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|p| *p <= 5)
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(bad),
        Some(Value::String(s)) => PRIORITIES
            .iter()
            .position(|p| p.eq_ignore_ascii_case(s))
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

/// Cancels the task if the request ends before its result (timeout, or the caller
/// went away and axum dropped the handler).
struct CancelOnDrop {
    armed: Option<(Arc<TenantRequester>, String)>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some((session, task_id)) = self.armed.take() {
            session.waiting.lock().remove(&task_id);
            *session.used.lock() = Instant::now();
            tokio::spawn(async move {
                let cancel = agent_message::Body::Cancel(Cancel {
                    task_id,
                    reason: "the REST request ended first".into(),
                    grace_ms: 0,
                });
                let _ = session.client.send(cancel, SendOptions::default()).await;
            });
        }
    }
}

pub async fn offer(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let gateway = s
        .tasks
        .as_ref()
        .ok_or_else(|| ApiError::Task {
            code: Code::Unavailable,
            message: "the agent plane is off on this server".into(),
        })?
        .clone();
    if !s.is_ready() {
        return Err(ApiError::NotReady);
    }
    // With authentication on, the gateway layer has checked the caller; the legacy
    // `--agent-token` check applies only without it.
    if let Some(token) = gateway.token.as_ref().filter(|_| !s.gateway.auth_enabled()) {
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            return Err(ApiError::Unauthenticated("a valid bearer token is required".into()));
        }
    }
    let tenant = headers
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
        .unwrap_or("default")
        .to_string();
    let body = crate::body::body_bytes(&s, body)?;
    let req: OfferBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::Malformed(format!("task request: {e}")))?;
    if req.capability.is_empty() {
        return Err(ApiError::Malformed("capability must not be empty".into()));
    }
    let payload = match (req.tool, req.payload) {
        (Some(_), Some(_)) => {
            return Err(ApiError::Malformed(
                "give either tool (with arguments) or payload, not both".into(),
            ))
        }
        (None, Some(payload)) => {
            if req.arguments.is_some() {
                return Err(ApiError::Malformed(
                    "arguments go with tool; put them in payload".into(),
                ));
            }
            payload
        }
        (Some(tool), None) if !tool.is_empty() => {
            let arguments = req.arguments.unwrap_or_else(|| json!({}));
            if !arguments.is_object() {
                return Err(ApiError::Malformed("arguments must be a JSON object".into()));
            }
            json!({"tool": tool, "arguments": arguments})
        }
        _ => {
            return Err(ApiError::Malformed(
                "a task needs tool (for the tool-running worker) or payload (any JSON)".into(),
            ))
        }
    };
    let priority = priority(req.priority.as_ref())?;
    let timeout = req.timeout_ms.map_or(DEFAULT_TIMEOUT, Duration::from_millis);
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err(ApiError::Malformed(format!(
            "timeout_ms must be 1..={}",
            MAX_TIMEOUT.as_millis()
        )));
    }
    let task_id = req
        .task_id
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("rest-{}", uuid::Uuid::new_v4()));

    // The client side of the gRPC hop; without spans, the caller's own traceparent
    // is passed on so the next hops still join the caller's trace.
    let (span, traceparent) = if telemetry::spans_enabled() {
        let span = tracing::info_span!(
            target: "lattice_server::observe",
            "agent.offer",
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.method = "NegotiateTask",
            task_id = %task_id,
            tenant = %tenant,
        );
        let tp = telemetry::traceparent_of(&span);
        (span, tp)
    } else {
        let tp = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (tracing::Span::none(), tp)
    };

    let user = headers
        .get(crate::gateway::USER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let session = gateway.session(&tenant, user)?;
    let (tx, rx) = oneshot::channel();
    if session.waiting.lock().insert(task_id.clone(), tx).is_some() {
        return Err(ApiError::Task {
            code: Code::AlreadyExists,
            message: format!("task '{task_id}' is already waited on by another request"),
        });
    }
    let mut guard = CancelOnDrop {
        armed: Some((session.clone(), task_id.clone())),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let offer = agent_message::Body::Offer(TaskOffer {
        task_id: task_id.clone(),
        capability: req.capability,
        payload: payload.to_string().into_bytes(),
        max_attempts: 0,
    });
    let opts = SendOptions {
        priority,
        deadline_us: wire::now_us() + i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX / 2),
        correlation_id: task_id.clone(),
        traceparent,
        ..SendOptions::default()
    };
    let outcome = tokio::time::timeout_at(deadline, async {
        session.client.send(offer, opts).await.map_err(|e| ApiError::Task {
            code: Code::Unavailable,
            message: format!("offering the task: {e}"),
        })?;
        rx.await.map_err(|_| ApiError::Task {
            code: Code::Unavailable,
            message: "the task session closed".into(),
        })
    })
    .await;
    drop(span);
    let result = match outcome {
        Err(_) => {
            return Err(ApiError::Task {
                code: Code::DeadlineExceeded,
                message: format!("task '{task_id}' did not finish within {} ms", timeout.as_millis()),
            })
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Outcome::Lost)) => {
            guard.armed = None;
            return Err(ApiError::Task {
                code: Code::Unavailable,
                message: format!("task '{task_id}' was lost with its session; retry with the same task_id"),
            });
        }
        Ok(Ok(Outcome::Done(r))) => r,
    };
    guard.armed = None;
    let status = result.status.unwrap_or_else(wire::ok_status);
    if status.code != 0 {
        return Err(ApiError::Task {
            code: Code::from_i32(status.code),
            message: status.message,
        });
    }
    // Tool outputs are JSON; anything else is returned as a string.
    let output = serde_json::from_slice::<Value>(&result.output)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&result.output).into_owned()));
    Ok(Json(json!({
        "task_id": task_id,
        "output": output,
        "worker_id": result.worker_id,
        "attempts": result.attempts,
    })))
}
