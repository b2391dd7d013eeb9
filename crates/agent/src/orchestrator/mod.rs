//! The orchestrator: accepts agent streams (`AgentCoordination.NegotiateTask`),
//! keeps each agent's session across reconnects, and routes tasks from requesters
//! to workers by capability and priority.
//!
//! # Shape
//! All routing state lives in one [`State`] behind a mutex, and changes only by
//! `State::apply(event, now)`, the pure state machine in [`machine`]. Each change
//! returns a [`Step`] (the store ops and the frames it produced) that is submitted
//! to the group committer before the lock is released, so the order of durable
//! writes is the order of state changes; its effects (metrics, logs, tool
//! cancellations) are carried out here. Each stream has a reader (the
//! `serve_stream` loop) and a writer task (`writer_task`); the writer sends a frame
//! only once its ticket is durable and acknowledges the agent's frames only up to
//! the highest seq whose effects are durable.
//!
//! # Guarantees
//! * A frame the orchestrator acknowledged survives `kill -9`; one it did not is
//!   resent by the agent after it reconnects.
//! * A task finishes once: the first result wins, later ones (from a worker that
//!   was presumed dead, or a resend) are acknowledged and ignored.
//! * Work runs at least once; side effects run once because tool calls carry the
//!   task id as idempotency key (see [`crate::tools`]).

use std::{
    collections::HashMap,
    ops::{Deref, DerefMut},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use futures::Stream;
use lattice_proto::agent::{
    agent_coordination_server::AgentCoordination, agent_response, AgentMessage, AgentResponse, Drain,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use lattice_observability::{Metrics, OutcomeLabels};

use crate::{
    agent_metrics::{AgentLoad, AgentMetrics},
    memory::MemoryBroker,
    records::coll,
    store::{Store, StoreError},
    tools::ToolGateway,
    wire::{self, code_name},
};

mod adopt;
mod fencing;
mod machine;
mod shared;
mod state;
mod stream;
mod sweeper;

use machine::Event;
use state::*;
use sweeper::sweep_task;

#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// Names this replica in Welcome frames and logs.
    pub id: String,
    /// Both sides send a heartbeat this often; three missed ones end the stream.
    pub heartbeat_interval: Duration,
    /// A session without a stream this long is forgotten (its pending tasks cancelled).
    pub session_idle_timeout: Duration,
    /// Tasks of a worker that has been gone this long are assigned to another one.
    pub reassign_after: Duration,
    /// Attempts before a task is dead-lettered, unless the offer says otherwise.
    pub max_attempts: u32,
    /// Queued tasks across every lane; offers beyond get RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// Tasks one requester may have outstanding; its stream is not read beyond that.
    pub requester_window: u32,
    /// How long a msg_id is remembered for dedupe, and the oldest sent_at accepted.
    pub dedupe_window: Duration,
    /// A queued task gains one priority level per `aging` it waits.
    pub aging: Duration,
    /// Consecutive failed tasks that open a worker's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps a worker out of rotation.
    pub breaker_cooldown: Duration,
    /// Load every persisted session at start (one orchestrator owns the store).
    /// With a store shared by replicas, sessions are adopted when they resume.
    pub adopt_all_on_start: bool,
    /// When set, streams must carry `authorization: Bearer <token>`.
    pub auth_token: Option<String>,
    /// On a store that replicas share (Redis), dispatch through its shared queue:
    /// any worker on any replica takes any task of its capability.
    pub shared_dispatch: bool,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig {
            id: wire::new_id(),
            heartbeat_interval: Duration::from_secs(5),
            session_idle_timeout: Duration::from_secs(300),
            reassign_after: Duration::from_secs(10),
            max_attempts: 3,
            max_queued: 100_000,
            requester_window: 1024,
            dedupe_window: Duration::from_secs(600),
            aging: Duration::from_secs(2),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(10),
            adopt_all_on_start: true,
            auth_token: None,
            shared_dispatch: true,
        }
    }
}

/// How one task ended, for the audit log: one per task offered, refused ones
/// included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskOutcome {
    pub task_id: String,
    pub tenant: String,
    pub user: String,
    pub capability: String,
    /// The gRPC code of the task's final status (0: done).
    pub code: i32,
    pub attempts: u32,
    /// The worker session that produced the result, if one did.
    pub worker: String,
    /// Unix microseconds of the offer and of the outcome.
    pub offered_us: i64,
    pub finished_us: i64,
}

/// Receives every task's outcome; called under the orchestrator's lock, so it must
/// only hand the outcome on (the audit log queues it without waiting).
pub trait TaskAudit: Send + Sync {
    fn task_finished(&self, outcome: TaskOutcome);
}

/// The gateway's verified user on a stream (it overwrites what the caller sent).
pub const USER_ID_METADATA: &str = "x-user-id";
/// Set to `1` by the gateway on the server's own streams (and on every stream with
/// authentication off), which may then name the user they act for.
pub const DELEGATE_METADATA: &str = "x-lattice-delegate";
/// The user a delegating stream acts for (the REST task gateway opens one session
/// per tenant and user).
pub const ON_BEHALF_OF_METADATA: &str = "x-lattice-on-behalf-of";

/// Cheap-to-clone handle; also the tonic service.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    cfg: OrchestratorConfig,
    store: Store,
    metrics: Arc<AgentMetrics>,
    tools: ToolGateway,
    memory: MemoryBroker,
    state: Mutex<Routing>,
    /// Cancelled on shutdown: streams get a Drain frame and end.
    draining: CancellationToken,
    /// Where task outcomes go, once set.
    task_audit: std::sync::OnceLock<Arc<dyn TaskAudit>>,
    /// Woken on every change while dispatch is shared: the loops that take tasks
    /// and read results look again at what this replica has room for and awaits.
    /// One notifier per loop: `notify_one` on a shared one would wake only one.
    shared_wake: Option<Arc<SharedWake>>,
    /// Times this replica started over after a fence proved its state stale;
    /// streams end and writers stop sending when it changes.
    resets: watch::Sender<u64>,
}

/// The notifiers of shared dispatch's take and result loops.
#[derive(Default)]
struct SharedWake {
    take: Notify,
    results: Notify,
}

/// The state machine's state and, beside it, what only the async shell needs: the
/// notifier each session's writer task waits on.
struct Routing {
    machine: State,
    wakers: HashMap<String, Arc<Notify>>,
}

impl Deref for Routing {
    type Target = State;
    fn deref(&self) -> &State {
        &self.machine
    }
}

impl DerefMut for Routing {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.machine
    }
}

impl Routing {
    /// The notifier of a session's writer (created on first use).
    fn waker(&mut self, sid: &str) -> Arc<Notify> {
        self.wakers.entry(sid.to_string()).or_default().clone()
    }
}

/// The clocks, read once per change.
fn now() -> Now {
    Now {
        at: tokio::time::Instant::now().into_std(),
        wall_us: wire::now_us(),
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<AgentResponse, Status>> + Send>>;

impl Orchestrator {
    pub async fn new(
        cfg: OrchestratorConfig,
        store: Store,
        tools: ToolGateway,
        metrics: Arc<Metrics>,
    ) -> Result<Orchestrator, StoreError> {
        let queue = store.queue().filter(|_| cfg.shared_dispatch).cloned();
        let rules = Rules {
            max_attempts: cfg.max_attempts,
            max_queued: cfg.max_queued,
            requester_window: cfg.requester_window,
            dedupe_window: cfg.dedupe_window,
            aging: cfg.aging,
            breaker_failures: cfg.breaker_failures,
            breaker_cooldown: cfg.breaker_cooldown,
            reassign_after: cfg.reassign_after,
            session_idle_timeout: cfg.session_idle_timeout,
            shared: queue.is_some(),
        };
        let orch = Orchestrator {
            inner: Arc::new(Inner {
                memory: MemoryBroker::new(store.clone()),
                cfg,
                store,
                metrics: metrics.set::<AgentMetrics>(),
                tools,
                state: Mutex::new(Routing {
                    machine: State::new(rules),
                    wakers: HashMap::new(),
                }),
                draining: CancellationToken::new(),
                task_audit: std::sync::OnceLock::new(),
                shared_wake: queue.as_ref().map(|_| Arc::new(SharedWake::default())),
                resets: watch::channel(0).0,
            }),
        };
        let weak = Arc::downgrade(&orch.inner);
        orch.inner.store.on_fenced(Box::new(move |fenced| {
            if let Some(inner) = weak.upgrade() {
                inner.fenced_off(fenced);
            }
        }));
        if orch.inner.cfg.adopt_all_on_start {
            let sessions = orch.inner.store.backend().scan(coll::SESSIONS).await?;
            for (sid, _) in sessions {
                orch.adopt(&sid).await?;
            }
            let mut st = orch.inner.state.lock();
            let step = st.apply(Event::Dispatch, now());
            orch.inner.commit(&mut st, step);
        }
        tokio::spawn(sweep_task(Arc::downgrade(&orch.inner)));
        if let Some(queue) = queue {
            shared::spawn(&orch.inner, queue);
        }
        let weak = Arc::downgrade(&orch.inner);
        orch.inner.metrics.read_load_from(Box::new(move || {
            weak.upgrade()
                .map(|inner| Orchestrator { inner }.load())
                .unwrap_or_default()
        }));
        Ok(orch)
    }

    /// Sends every task's outcome to `audit` from now on; a second call is ignored.
    pub fn set_task_audit(&self, audit: Arc<dyn TaskAudit>) {
        let _ = self.inner.task_audit.set(audit);
    }

    pub fn tools(&self) -> &ToolGateway {
        &self.inner.tools
    }

    /// Sends `Drain` to every stream and ends them: agents reconnect elsewhere (or
    /// here, after a restart) and resume.
    pub async fn drain(&self, reason: &str, reconnect_after: Duration) {
        // Stop first: no frame is processed and no answer recorded after this, so
        // the replica the agents move to sees every write this one made...
        self.inner.draining.cancel();
        // A handler that passed its draining check before the cancel holds the state
        // lock until its writes are submitted; taking the lock waits for it.
        drop(self.inner.state.lock());
        // ...once the writes already submitted are durable.
        let barrier = self.inner.store.submit(Vec::new());
        self.inner.store.durable(barrier).await;
        let wakes: Vec<Arc<Notify>> = {
            let mut st = self.inner.state.lock();
            let attached: Vec<String> = st
                .sessions
                .values_mut()
                .filter(|s| s.attached.is_some())
                .map(|s| {
                    s.control.push_back(wire::response(
                        wire::envelope(""),
                        agent_response::Body::Drain(Drain {
                            reconnect_after_ms: u32::try_from(reconnect_after.as_millis()).unwrap_or(u32::MAX),
                            reason: reason.to_string(),
                            resume_token: s.meta.session_id.clone().into_bytes(),
                        }),
                    ));
                    s.meta.session_id.clone()
                })
                .collect();
            attached.iter().map(|sid| st.waker(sid)).collect()
        };
        for w in wakes {
            w.notify_one();
        }
    }

    /// Snapshot of sessions by lifecycle state, for metrics and tests.
    pub fn session_counts(&self) -> (usize, usize) {
        let st = self.inner.state.lock();
        let attached = st.sessions.values().filter(|s| s.attached.is_some()).count();
        (attached, st.sessions.len() - attached)
    }

    /// Sessions and queue depths, for the metrics.
    pub fn load(&self) -> AgentLoad {
        let (established, detached) = self.session_counts();
        AgentLoad {
            established,
            detached,
            queued: self.queue_depths(),
        }
    }

    /// A session's tasks outstanding and frames waiting for its acknowledgement.
    pub fn session_backlog(&self, sid: &str) -> Option<(usize, usize)> {
        let st = self.inner.state.lock();
        st.sessions.get(sid).map(|s| (s.outstanding, s.outbox.len()))
    }

    /// Queued tasks per priority level (0..=5).
    pub fn queue_depths(&self) -> [usize; 6] {
        let st = self.inner.state.lock();
        let mut d = [0; 6];
        for t in st.tasks.values().filter(|t| t.is_queued()) {
            d[(t.priority as usize).min(5)] += 1;
        }
        d
    }
}

impl Inner {
    /// Submits a step's writes as one ticket, stamps its frames with it, wakes the
    /// writers that have something to send, and carries out its effects.
    fn commit(&self, st: &mut Routing, mut step: Step) -> u64 {
        // A session that got frames persists its numbering with them.
        let mut pushed_to: Vec<&String> = step.pushed.iter().map(|(sid, _)| sid).collect();
        pushed_to.sort();
        pushed_to.dedup();
        let mut metas = Step::default();
        for s in pushed_to.into_iter().filter_map(|sid| st.sessions.get(sid)) {
            metas.put_session(s);
        }
        step.ops.append(&mut metas.ops);
        if self.shared_wake.is_some() {
            // After the records, so a task moved to a new session in this step
            // (a Del of the old record, a Put of the new) ends up indexed.
            let mut index = fencing::holder_index(&step.ops);
            step.ops.append(&mut index);
        }
        let claims: Vec<String> = step
            .fences
            .iter()
            .filter(|f| f.claims_from.is_some())
            .map(|f| f.sid.clone())
            .collect();
        let ticket = if self.store.fencing() {
            let fences = fencing::fences(st, &step.ops, std::mem::take(&mut step.fences));
            self.store.submit_fenced(step.ops, fences)
        } else {
            self.store.submit(step.ops)
        };
        for sid in claims {
            if let Some(s) = st.sessions.get_mut(&sid) {
                s.claim_ticket = ticket;
            }
        }
        for (sid, seq) in step.pushed {
            if let Some(p) = st.sessions.get_mut(&sid).and_then(|s| s.outbox.get_mut(seq)) {
                p.ticket = ticket;
            }
        }
        for sid in step.wake {
            if let Some(w) = st.wakers.get(&sid) {
                w.notify_one();
            }
            if !st.sessions.contains_key(&sid) {
                st.wakers.remove(&sid);
            }
        }
        for effect in step.effects {
            self.carry_out(effect);
        }
        if let Some(w) = &self.shared_wake {
            w.take.notify_one();
            w.results.notify_one();
        }
        ticket
    }

    fn carry_out(&self, effect: Effect) {
        let m = &self.metrics;
        match effect {
            Effect::Finished { code, took_us } => {
                let outcome = code_name(Code::from_i32(code));
                m.agent_tasks.get_or_create(&OutcomeLabels { outcome }).inc();
                if took_us > 0 {
                    m.agent_task_duration.observe(took_us as f64 / 1e6);
                }
            }
            Effect::Dispatched { waited_us } => m.agent_dispatch.observe(waited_us as f64 / 1e6),
            Effect::Refused => {
                m.agent_credit_waits
                    .get_or_create(&OutcomeLabels { outcome: "refused" })
                    .inc();
            }
            Effect::Resent(n) => {
                m.agent_resent.inc_by(n as u64);
            }
            Effect::CancelTools { task_id } => self.tools.cancel_task(&task_id),
            Effect::BreakerOpened { worker } => tracing::warn!(worker, "circuit breaker open"),
            Effect::DeadLettered { task_id, attempts, why } => {
                tracing::warn!(task = task_id, attempts, reason = %why, "task dead-lettered")
            }
            Effect::Evicted { session } => tracing::info!(session, "idle session evicted"),
            Effect::Outcome(outcome) => {
                if let Some(audit) = self.task_audit.get() {
                    audit.task_finished(outcome);
                }
            }
        }
    }
}

#[tonic::async_trait]
impl AgentCoordination for Orchestrator {
    type NegotiateTaskStream = ResponseStream;

    async fn negotiate_task(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<ResponseStream>, Status> {
        if let Some(token) = &self.inner.cfg.auth_token {
            let given = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if given != Some(token.as_str()) {
                return Err(Status::unauthenticated("missing or wrong bearer token"));
            }
        }
        if self.inner.draining.is_cancelled() {
            return Err(Status::unavailable(
                "orchestrator is draining; reconnect to another replica",
            ));
        }
        let named = request.metadata().get("x-tenant").and_then(|v| v.to_str().ok());
        // The tenant the stream's metadata names binds its hello unless the stream
        // may act for others: behind the gateway with authentication on, that
        // metadata is the verified tenant, and a hello naming another is refused.
        let tenant_bound = named.is_some();
        let tenant = named.unwrap_or("default").to_string();
        let md = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|u| u.len() <= 128)
                .unwrap_or("")
                .to_string()
        };
        let delegate = md(DELEGATE_METADATA) == "1";
        let on_behalf_of = md(ON_BEHALF_OF_METADATA);
        let user = if delegate && !on_behalf_of.is_empty() {
            on_behalf_of
        } else {
            md(USER_ID_METADATA)
        };
        let (tx, rx) = mpsc::channel(256);
        let tenant = stream::StreamTenant {
            tenant,
            bound: tenant_bound && !delegate,
        };
        tokio::spawn(self.clone().serve_stream(request.into_inner(), tx, tenant, user));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
