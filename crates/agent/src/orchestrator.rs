//! The orchestrator: accepts agent streams (`AgentCoordination.NegotiateTask`),
//! keeps each agent's session across reconnects, and routes tasks from requesters
//! to workers by capability and priority.
//!
//! # Shape
//! All routing state lives in one [`State`] behind a mutex; every change to it
//! happens in a [`Step`] that collects the store ops and the frames it produced and
//! is submitted to the group committer before the lock is released, so the order of
//! durable writes is the order of state changes. Each stream has a reader (the
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
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures::Stream;
use lattice_proto::agent::{
    agent_coordination_server::AgentCoordination, agent_message, agent_response, AgentMessage, AgentResponse, Cancel,
    Drain, Envelope, Heartbeat, Hello, ResumeResult, TaskAssign, TaskResult, Welcome,
};
use parking_lot::Mutex;
use prost::Message;
use tokio::{
    sync::{mpsc, Notify},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use lattice_observability::{
    metrics::{AgentLoad, FrameLabels, OutcomeLabels},
    telemetry, Metrics,
};
use tracing::Instrument;

use crate::{
    lanes::Lanes,
    memory::MemoryBroker,
    records::{coll, SessionMeta, TaskRecord, TaskState},
    session::{Inbox, Outbox, Verdict},
    store::{seq_key, Op, Store},
    tools::{CallContext, ToolGateway},
    wire::{self, now_us, status},
};

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
        }
    }
}

/// Cheap-to-clone handle; also the tonic service.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: OrchestratorConfig,
    store: Store,
    metrics: Arc<Metrics>,
    tools: ToolGateway,
    memory: MemoryBroker,
    state: Mutex<State>,
    /// Cancelled on shutdown: streams get a Drain frame and end.
    draining: CancellationToken,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    /// Tasks not yet finished, and finished ones whose result the requester has not
    /// acknowledged (so a late duplicate result is recognised).
    tasks: HashMap<String, Task>,
    lanes: HashMap<String, Lanes>,
    queued: usize,
}

struct Task {
    rec: TaskRecord,
    /// When it was assigned to a worker this process has not seen attach.
    orphaned_since: Option<Instant>,
}

#[derive(Clone)]
struct Pending {
    frame: AgentResponse,
    /// The commit that made it durable; the writer waits for it before sending.
    ticket: u64,
}

struct Session {
    meta: SessionMeta,
    inbox: Inbox,
    /// Agent seqs received whose effects are still running (tool calls, memory
    /// ops): the acknowledged seq stays below them.
    incomplete: BTreeSet<u64>,
    /// Ticket of the last inbound state change; acks wait for it.
    in_ticket: u64,
    outbox: Outbox<Pending>,
    /// Unsequenced frames waiting for the writer (welcome, heartbeat, drain, progress).
    control: VecDeque<AgentResponse>,
    /// Highest outbox seq the current writer has sent.
    cursor: u64,
    /// Epoch of the stream attached now, if any.
    attached: Option<u64>,
    detached_since: Option<Instant>,
    wake: Arc<Notify>,
    /// Worker: tasks assigned and not finished.
    in_flight: HashSet<String>,
    breaker: Breaker,
    /// Requester: tasks offered whose result is not yet acknowledged.
    outstanding: usize,
    rtt_us: u64,
    last_echo_us: i64,
}

#[derive(Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

impl Session {
    fn new(meta: SessionMeta, dedupe_window: Duration) -> Session {
        Session {
            inbox: Inbox::new(meta.in_hwm, dedupe_window, 65_536),
            meta,
            incomplete: BTreeSet::new(),
            in_ticket: 0,
            outbox: Outbox::new(1),
            control: VecDeque::new(),
            cursor: 0,
            attached: None,
            detached_since: Some(Instant::now()),
            wake: Arc::new(Notify::new()),
            in_flight: HashSet::new(),
            breaker: Breaker::default(),
            outstanding: 0,
            rtt_us: 0,
            last_echo_us: 0,
        }
    }

    /// Highest agent seq whose effects are durable once `in_ticket` is.
    fn completed_hwm(&self) -> u64 {
        match self.incomplete.first() {
            Some(first) => first - 1,
            None => self.inbox.hwm(),
        }
    }

    fn is_worker(&self) -> bool {
        !self.meta.capabilities.is_empty()
    }

    fn can_take(&self, now: Instant) -> bool {
        if self.attached.is_none() || !self.is_worker() {
            return false;
        }
        let cap = match self.breaker.open_until {
            Some(t) if t > now => return false,
            // Half-open: one task to probe the worker.
            Some(_) => 1,
            None => self.meta.max_in_flight.max(1) as usize,
        };
        self.in_flight.len() < cap
    }
}

/// Changes made under the state lock, submitted as one ticket.
#[derive(Default)]
struct Step {
    ops: Vec<Op>,
    pushed: Vec<(String, u64)>,
    wake: Vec<String>,
}

impl Step {
    /// Persists the session's metadata with its current high-water marks. The
    /// in-memory `meta` holds only the static fields; the marks are computed here,
    /// so no write can carry stale ones.
    fn put_session(&mut self, s: &Session) {
        let meta = SessionMeta {
            in_hwm: s.completed_hwm(),
            out_seq: s.outbox.next_seq() - 1,
            ..s.meta.clone()
        };
        self.ops.push(Op::Put {
            coll: coll::SESSIONS.into(),
            key: meta.session_id.clone(),
            val: Bytes::from(meta.encode_to_vec()),
        });
    }

    fn put_task(&mut self, rec: &TaskRecord) {
        self.ops.push(Op::Put {
            coll: coll::tasks(&rec.requester),
            key: rec.task_id.clone(),
            val: Bytes::from(rec.encode_to_vec()),
        });
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<AgentResponse, Status>> + Send>>;

impl Orchestrator {
    pub async fn new(
        cfg: OrchestratorConfig,
        store: Store,
        tools: ToolGateway,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Orchestrator> {
        let orch = Orchestrator {
            inner: Arc::new(Inner {
                memory: MemoryBroker::new(store.clone()),
                cfg,
                store,
                metrics: metrics.clone(),
                tools,
                state: Mutex::new(State::default()),
                draining: CancellationToken::new(),
            }),
        };
        if orch.inner.cfg.adopt_all_on_start {
            let sessions = orch.inner.store.backend().scan(coll::SESSIONS).await?;
            for (sid, _) in sessions {
                orch.adopt(&sid).await?;
            }
            let mut st = orch.inner.state.lock();
            let mut step = Step::default();
            dispatch(&orch.inner, &mut st, &mut step);
            orch.commit(&mut st, step);
        }
        tokio::spawn(sweep_task(Arc::downgrade(&orch.inner)));
        let weak = Arc::downgrade(&orch.inner);
        metrics.set_agent_source(Box::new(move || {
            weak.upgrade()
                .map(|inner| Orchestrator { inner }.load())
                .unwrap_or_default()
        }));
        Ok(orch)
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
            st.sessions
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
                    s.wake.clone()
                })
                .collect()
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
        for t in st.tasks.values() {
            if t.rec.state() == TaskState::Queued {
                d[(t.rec.priority as usize).min(5)] += 1;
            }
        }
        d
    }

    fn commit(&self, st: &mut State, step: Step) {
        commit(&self.inner, st, step);
    }

    /// Loads a persisted session (and the tasks it offered) into memory, unless it
    /// is there already. Returns whether the session exists.
    async fn adopt(&self, sid: &str) -> anyhow::Result<bool> {
        if self.inner.state.lock().sessions.contains_key(sid) {
            return Ok(true);
        }
        // A barrier first: this replica's own writes still in the group commit (an
        // eviction's deletes) land before the read, so an evicted session is not
        // read back to life.
        let barrier = self.inner.store.submit(Vec::new());
        self.inner.store.durable(barrier).await;
        let backend = self.inner.store.backend();
        let Some(meta) = backend.get(coll::SESSIONS, sid).await? else {
            return Ok(false);
        };
        let meta = SessionMeta::decode(meta)?;
        let frames = backend.scan(&coll::outbox(sid)).await?;
        let tasks = backend.scan(&coll::tasks(sid)).await?;
        let mut st = self.inner.state.lock();
        if st.sessions.contains_key(sid) {
            return Ok(true);
        }
        let mut session = Session::new(meta, self.inner.cfg.dedupe_window);
        session.outbox = Outbox::new(session.meta.out_seq + 1);
        for (key, frame) in frames {
            let seq: u64 = key.parse()?;
            session.outbox.restore(
                seq,
                Pending {
                    frame: AgentResponse::decode(frame)?,
                    ticket: 0,
                },
            );
        }
        let now = Instant::now();
        for (_, rec) in tasks {
            let rec = TaskRecord::decode(rec)?;
            session.outstanding += 1;
            if st.tasks.contains_key(&rec.task_id) {
                continue;
            }
            let mut task = Task {
                rec,
                orphaned_since: None,
            };
            match TaskState::try_from(task.rec.state) {
                Ok(TaskState::Queued) => {
                    st.lanes
                        .entry(task.rec.capability.clone())
                        .or_insert_with(|| Lanes::new(self.inner.cfg.aging))
                        .push(task.rec.priority, task.rec.task_id.clone(), now);
                    st.queued += 1;
                }
                Ok(TaskState::Assigned) => match st.sessions.get_mut(&task.rec.worker) {
                    Some(w) if w.attached.is_some() => {
                        w.in_flight.insert(task.rec.task_id.clone());
                    }
                    _ => task.orphaned_since = Some(now),
                },
                _ => {}
            }
            st.tasks.insert(task.rec.task_id.clone(), task);
        }
        // Tasks other sessions hold that this worker still runs.
        let sid_owned = sid.to_string();
        let mine: Vec<String> = st
            .tasks
            .values_mut()
            .filter(|t| t.rec.worker == sid_owned && t.rec.state() == TaskState::Assigned)
            .map(|t| {
                t.orphaned_since = None;
                t.rec.task_id.clone()
            })
            .collect();
        session.in_flight.extend(mine);
        st.sessions.insert(sid_owned, session);
        Ok(true)
    }

    async fn attach(&self, hello: Hello, agent_id: String, tenant: String) -> Result<(String, u64), Status> {
        if hello.protocol_version != wire::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported (this orchestrator speaks {})",
                hello.protocol_version,
                wire::PROTOCOL_VERSION
            )));
        }
        let resume = hello.resume.clone().filter(|r| !r.session_id.is_empty());
        let mut result = ResumeResult::Fresh;
        if let Some(r) = &resume {
            let found = self
                .adopt(&r.session_id)
                .await
                .map_err(|e| Status::unavailable(format!("agent store: {e}")))?;
            result = if found {
                ResumeResult::Resumed
            } else {
                ResumeResult::Gap
            };
        }
        let outcome = match result {
            ResumeResult::Fresh => "fresh",
            ResumeResult::Resumed => "resumed",
            ResumeResult::Gap => "gap",
        };
        self.inner
            .metrics
            .agent_resumes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        let mut st = self.inner.state.lock();
        let mut step = Step::default();
        let sid = match (&resume, result) {
            (Some(r), ResumeResult::Resumed) => r.session_id.clone(),
            _ => {
                let meta = SessionMeta {
                    session_id: wire::new_id(),
                    agent_id: agent_id.clone(),
                    tenant: tenant.clone(),
                    ..SessionMeta::default()
                };
                let sid = meta.session_id.clone();
                st.sessions
                    .insert(sid.clone(), Session::new(meta, self.inner.cfg.dedupe_window));
                sid
            }
        };
        let heartbeat_ms = u32::try_from(self.inner.cfg.heartbeat_interval.as_millis()).unwrap_or(u32::MAX);
        let window = self.inner.cfg.requester_window;
        let orchestrator_id = self.inner.cfg.id.clone();
        let s = st.sessions.get_mut(&sid).expect("inserted or adopted above");
        s.meta.epoch += 1;
        let epoch = s.meta.epoch;
        s.attached = Some(epoch);
        s.detached_since = None;
        s.cursor = 0;
        s.control.clear();
        s.meta.agent_id = agent_id;
        s.meta.tenant = tenant;
        s.meta.capabilities = hello.capabilities.clone();
        s.meta.max_in_flight = hello.max_in_flight.max(1);
        s.meta.last_active_us = now_us();
        let resumed_acks = resume
            .as_ref()
            .map(|r| s.outbox.ack(r.last_received_seq))
            .unwrap_or_default();
        self.inner.metrics.agent_resent.inc_by(s.outbox.len() as u64);
        s.control.push_back(wire::response(
            wire::envelope(""),
            agent_response::Body::Welcome(Welcome {
                session_id: sid.clone(),
                epoch,
                result: result as i32,
                last_received_seq: s.completed_hwm(),
                heartbeat_interval_ms: heartbeat_ms,
                max_in_flight: window,
                resume_token: sid.clone().into_bytes(),
                orchestrator_id,
            }),
        ));
        step.put_session(s);
        step.wake.push(sid.clone());
        // A worker that kept running tasks through an orchestrator restart keeps them.
        if let Some(r) = &resume {
            for id in &r.running_task_ids {
                if let Some(t) = st.tasks.get_mut(id) {
                    if t.rec.state() == TaskState::Assigned {
                        let previous = std::mem::replace(&mut t.rec.worker, sid.clone());
                        t.orphaned_since = None;
                        if let Some(p) = st.sessions.get_mut(&previous) {
                            p.in_flight.remove(id);
                        }
                        st.sessions.get_mut(&sid).expect("present").in_flight.insert(id.clone());
                    }
                }
            }
        }
        // Tasks assigned to this worker before it went away are its again.
        let mine: Vec<String> = st
            .tasks
            .values_mut()
            .filter(|t| t.rec.worker == sid && t.rec.state() == TaskState::Assigned)
            .map(|t| {
                t.orphaned_since = None;
                t.rec.task_id.clone()
            })
            .collect();
        st.sessions.get_mut(&sid).expect("present").in_flight.extend(mine);
        // What the agent says it received is acknowledged like any ack: a result
        // it got just before the cut ends its task's life here too.
        on_acked(&self.inner, &mut st, &sid, resumed_acks, &mut step);
        dispatch(&self.inner, &mut st, &mut step);
        self.commit(&mut st, step);
        Ok((sid, epoch))
    }

    /// The stream's life after the Hello: read frames until the agent leaves, the
    /// stream breaks, heartbeats stop, or the orchestrator drains.
    async fn serve_stream(
        self,
        mut inbound: Streaming<AgentMessage>,
        tx: mpsc::Sender<Result<AgentResponse, Status>>,
        tenant: String,
    ) {
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message()).await;
        let hello = match first {
            Err(_) => {
                let _ = tx.send(Err(Status::deadline_exceeded("no hello within 10 s"))).await;
                return;
            }
            Ok(Err(status)) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(msg))) => match msg.body {
                Some(agent_message::Body::Hello(h)) => (h, msg.agent_id),
                other => {
                    let kind = other.as_ref().map_or("an empty frame", wire::request_kind);
                    let _ = tx
                        .send(Err(Status::failed_precondition(format!(
                            "the first frame must be hello, got {kind}"
                        ))))
                        .await;
                    return;
                }
            },
        };
        let (hello, agent_id) = hello;
        let tenant = if hello.tenant.is_empty() {
            tenant
        } else {
            hello.tenant.clone()
        };
        let (sid, epoch) = match self.attach(hello, agent_id, tenant).await {
            Ok(v) => v,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let writer = tokio::spawn(writer_task(self.inner.clone(), sid.clone(), epoch, tx.clone()));
        let miss = self.inner.cfg.heartbeat_interval * 3;
        let end: Option<Status> = loop {
            let next = tokio::select! {
                r = tokio::time::timeout(miss, inbound.message()) => r,
                () = self.inner.draining.cancelled() => break None,
            };
            match next {
                Err(_) => break Some(Status::unavailable("no frame within three heartbeat intervals")),
                Ok(Err(status)) => break Some(status),
                Ok(Ok(None)) => break None,
                Ok(Ok(Some(msg))) => {
                    if let Err(status) = self.handle(&sid, epoch, msg).await {
                        break Some(status);
                    }
                }
            }
        };
        if self.inner.draining.is_cancelled() {
            // Let the writer flush the Drain frame before the stream ends.
            let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        } else if let Some(status) = end {
            let _ = tx.send(Err(status)).await;
        }
        let mut st = self.inner.state.lock();
        if let Some(s) = st.sessions.get_mut(&sid) {
            if s.attached == Some(epoch) {
                s.attached = None;
                s.detached_since = Some(Instant::now());
                s.wake.notify_one();
            }
        }
    }

    async fn handle(&self, sid: &str, epoch: u64, msg: AgentMessage) -> Result<(), Status> {
        use agent_message::Body;
        let env = msg.env.unwrap_or_default();
        let Some(body) = msg.body else {
            return Err(Status::invalid_argument("frame without a body"));
        };
        self.inner
            .metrics
            .agent_frames
            .get_or_create(&FrameLabels {
                direction: "in",
                kind: wire::request_kind(&body),
            })
            .inc();
        let priority = u32::try_from(msg.priority).unwrap_or(0).min(5);
        if self.inner.draining.is_cancelled() {
            return Err(Status::unavailable("orchestrator is draining"));
        }
        if let Body::Result(r) = &body {
            // The requester's session may not be loaded here yet (this replica took
            // over from another): load it first.
            let known = self.inner.state.lock().tasks.contains_key(&r.task_id);
            if !known && !r.route.is_empty() {
                let _ = self.adopt(&r.route).await;
            }
        }
        let mut st = self.inner.state.lock();
        if self.inner.draining.is_cancelled() {
            return Err(Status::unavailable("orchestrator is draining"));
        }
        let mut step = Step::default();
        let Some(s) = st.sessions.get_mut(sid) else {
            return Err(Status::unavailable("session evicted"));
        };
        if s.attached != Some(epoch) {
            return Err(Status::aborted("a newer stream of this session took over"));
        }
        s.meta.last_active_us = env.sent_at_us;
        if env.ack_seq > 0 {
            let acked = s.outbox.ack(env.ack_seq);
            on_acked(&self.inner, &mut st, sid, acked, &mut step);
        }
        if !wire::is_reliable_request(&body) {
            let s = st.sessions.get_mut(sid).expect("checked above");
            match body {
                Body::Heartbeat(hb) => {
                    if hb.echo_sent_at_us > 0 {
                        s.rtt_us = u64::try_from(now_us() - hb.echo_sent_at_us).unwrap_or(0);
                        self.inner.metrics.agent_heartbeat_rtt.observe(s.rtt_us as f64 / 1e6);
                    }
                    s.last_echo_us = hb.sent_at_us;
                }
                Body::Credit(c) => {
                    s.meta.max_in_flight = c.max_in_flight.max(1);
                    step.put_session(s);
                    dispatch(&self.inner, &mut st, &mut step);
                }
                Body::Goodbye(_) => {
                    end_session(&self.inner, &mut st, sid, &mut step);
                    self.commit(&mut st, step);
                    return Err(Status::ok("goodbye"));
                }
                Body::Hello(_) => return Err(Status::failed_precondition("hello sent twice on one stream")),
                Body::Error(e) => {
                    tracing::warn!(session = sid, code = e.code, message = %e.message, "agent reported an error")
                }
                _ => {}
            }
            self.commit(&mut st, step);
            return Ok(());
        }
        let s = st.sessions.get_mut(sid).expect("checked above");
        // The window is a credit the client library honours (Welcome.max_in_flight).
        // After a crash the count here can run up to one window ahead of the
        // client's (acks whose deletes were not yet durable), so offers are refused
        // in-band only past twice the window; a requester that ignores refusals and
        // does not read its results has its stream ended past three windows (it
        // resends after resuming), so its session's memory stays bounded.
        if matches!(body, Body::Offer(_)) && s.outstanding >= 3 * self.inner.cfg.requester_window as usize {
            self.inner
                .metrics
                .agent_credit_waits
                .get_or_create(&OutcomeLabels {
                    outcome: "stream_ended",
                })
                .inc();
            return Err(Status::resource_exhausted(format!(
                "{} tasks outstanding, three times the window: read your results",
                s.outstanding
            )));
        }
        match s.inbox.check(env.seq_no, &env.msg_id, env.sent_at_us) {
            Verdict::New => {}
            Verdict::Duplicate => {
                self.inner
                    .metrics
                    .agent_dropped
                    .get_or_create(&OutcomeLabels { outcome: "duplicate" })
                    .inc();
                // Re-acknowledge so the agent frees its outbox; nothing runs again.
                // The high-water mark may have moved (a msg_id seen under another
                // seq): persist it before the ack goes out.
                step.put_session(s);
                step.wake.push(sid.to_string());
                let ticket = commit(&self.inner, &mut st, step);
                if let Some(s) = st.sessions.get_mut(sid) {
                    s.in_ticket = ticket;
                }
                return Ok(());
            }
            Verdict::Skewed => {
                return Err(Status::invalid_argument(format!(
                    "frame {} sent more than 30 s in the future: check the agent's clock",
                    env.seq_no
                )))
            }
            Verdict::Gap { expected } => {
                return Err(Status::failed_precondition(format!(
                    "frame seq {} arrived, {expected} expected: frames are missing",
                    env.seq_no
                )))
            }
        }
        let seq = env.seq_no;
        match body {
            Body::Offer(offer) => {
                on_offer(&self.inner, &mut st, sid, &env, priority, offer, &mut step);
            }
            Body::Result(result) => {
                on_result(&self.inner, &mut st, sid, result, &mut step);
            }
            Body::Cancel(cancel) => {
                let owned = st.tasks.get(&cancel.task_id).is_some_and(|t| t.rec.requester == sid);
                if owned {
                    cancel_task(&self.inner, &mut st, &cancel.task_id, &cancel.reason, &mut step);
                }
            }
            Body::ToolCall(call) => {
                s.incomplete.insert(seq);
                let ctx = CallContext {
                    tenant: s.meta.tenant.clone(),
                    // Without a key the frame's msg_id is one: a resend after a crash
                    // is answered from the cache instead of running again.
                    idempotency_key: if env.idempotency_key.is_empty() {
                        env.msg_id.clone()
                    } else {
                        env.idempotency_key.clone()
                    },
                    task_id: env.correlation_id.clone(),
                    deadline_us: env.deadline_us,
                };
                let this = self.clone();
                let sid = sid.to_string();
                let span = tracing::info_span!(
                    "tool.call",
                    tool = %call.tool,
                    task_id = %ctx.task_id,
                    trace_id = tracing::field::Empty,
                    span_id = tracing::field::Empty
                );
                telemetry::adopt(&span, telemetry::context_from_traceparent(&env.traceparent));
                tokio::spawn(
                    async move {
                        let result = this.inner.tools.call(&ctx, call).await;
                        this.complete(&sid, seq, &ctx.task_id, agent_response::Body::ToolResult(result));
                    }
                    .instrument(span),
                );
            }
            Body::MemoryOp(op) => {
                s.incomplete.insert(seq);
                let tenant = s.meta.tenant.clone();
                let idem = if env.idempotency_key.is_empty() {
                    env.msg_id.clone()
                } else {
                    env.idempotency_key.clone()
                };
                let this = self.clone();
                let sid = sid.to_string();
                let corr = env.correlation_id.clone();
                tokio::spawn(async move {
                    let kind = match op.op {
                        Some(lattice_proto::agent::memory_op::Op::Get(_)) => "get",
                        Some(lattice_proto::agent::memory_op::Op::Put(_)) => "put",
                        Some(lattice_proto::agent::memory_op::Op::Sync(_)) => "sync",
                        None => "none",
                    };
                    let result = this.inner.memory.handle(&tenant, op, &idem).await;
                    let outcome = code_name(wire::code_of(&result.status));
                    this.inner
                        .metrics
                        .memory_ops
                        .get_or_create(&lattice_observability::metrics::MemoryLabels { op: kind, outcome })
                        .inc();
                    this.complete(&sid, seq, &corr, agent_response::Body::Memory(result));
                });
            }
            Body::Progress(mut p) => {
                let requester = st.tasks.get(&p.task_id).map(|t| t.rec.requester.clone());
                // Advisory: dropped for a detached requester or a full control queue.
                if let Some(r) = requester
                    .and_then(|r| st.sessions.get_mut(&r))
                    .filter(|r| r.attached.is_some() && r.control.len() < 64)
                {
                    p.route.clear();
                    r.control.push_back(wire::response(
                        wire::envelope(&p.task_id),
                        agent_response::Body::Progress(p),
                    ));
                    r.wake.notify_one();
                }
            }
            _ => {}
        }
        if let Some(s) = st.sessions.get(sid) {
            step.put_session(s);
            step.wake.push(sid.to_string());
        }
        let ticket = commit(&self.inner, &mut st, step);
        if let Some(s) = st.sessions.get_mut(sid) {
            s.in_ticket = ticket;
        }
        Ok(())
    }

    /// An asynchronous op (tool call, memory op) finished: its answer joins the
    /// outbox and the acknowledged seq may advance past it.
    fn complete(&self, sid: &str, seq: u64, correlation_id: &str, body: agent_response::Body) {
        if self.inner.draining.is_cancelled() {
            // The agent resends the request to the replica it moves to; the tool
            // cache or the memory op's idempotency key answers it there.
            return;
        }
        let mut st = self.inner.state.lock();
        if self.inner.draining.is_cancelled() {
            return;
        }
        let mut step = Step::default();
        let Some(s) = st.sessions.get_mut(sid) else {
            return;
        };
        s.incomplete.remove(&seq);
        push_frame(s, &mut step, wire::envelope(correlation_id), body);
        step.put_session(s);
        let ticket = commit(&self.inner, &mut st, step);
        if let Some(s) = st.sessions.get_mut(sid) {
            s.in_ticket = ticket;
        }
    }
}

fn commit(inner: &Inner, st: &mut State, mut step: Step) -> u64 {
    // A session that got frames persists its numbering with them.
    let mut pushed_to: Vec<&String> = step.pushed.iter().map(|(sid, _)| sid).collect();
    pushed_to.sort();
    pushed_to.dedup();
    let metas: Vec<Op> = pushed_to
        .into_iter()
        .filter_map(|sid| st.sessions.get(sid))
        .map(|s| {
            let mut one = Step::default();
            one.put_session(s);
            one.ops.pop().expect("put_session pushes one op")
        })
        .collect();
    step.ops.extend(metas);
    let ticket = inner.store.submit(step.ops);
    for (sid, seq) in step.pushed {
        if let Some(p) = st.sessions.get_mut(&sid).and_then(|s| s.outbox.get_mut(seq)) {
            p.ticket = ticket;
        }
    }
    for sid in step.wake {
        if let Some(s) = st.sessions.get(&sid) {
            s.wake.notify_one();
        }
    }
    ticket
}

/// Numbers a reliable frame, keeps it in the session's outbox and persists it.
fn push_frame(s: &mut Session, step: &mut Step, env: Envelope, body: agent_response::Body) {
    let sid = s.meta.session_id.clone();
    let (seq, pending) = s.outbox.push(|seq| Pending {
        frame: AgentResponse {
            env: Some(Envelope { seq_no: seq, ..env }),
            body: Some(body),
        },
        ticket: 0,
    });
    step.ops.push(Op::Put {
        coll: coll::outbox(&sid),
        key: seq_key(seq),
        val: Bytes::from(pending.frame.encode_to_vec()),
    });
    step.pushed.push((sid.clone(), seq));
    step.wake.push(sid);
}

fn on_offer(
    inner: &Inner,
    st: &mut State,
    sid: &str,
    env: &Envelope,
    priority: u32,
    offer: lattice_proto::agent::TaskOffer,
    step: &mut Step,
) {
    if offer.task_id.is_empty() || st.tasks.contains_key(&offer.task_id) {
        // A resend of a task we hold (or a nameless one we cannot track).
        return;
    }
    // The task's span continues the requester's trace; the assignment carries it on,
    // so the worker's and the tool's spans hang under it.
    let span = tracing::info_span!(
        "agent.task",
        task_id = %offer.task_id,
        capability = %offer.capability,
        priority,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty
    );
    telemetry::adopt(&span, telemetry::context_from_traceparent(&env.traceparent));
    let traceparent = telemetry::traceparent_of(&span);
    let s = st.sessions.get_mut(sid).expect("caller checked");
    let mut rec = TaskRecord {
        task_id: offer.task_id.clone(),
        requester: sid.to_string(),
        capability: offer.capability,
        payload: Bytes::from(offer.payload),
        priority,
        deadline_us: env.deadline_us,
        attempts: 0,
        max_attempts: if offer.max_attempts > 0 {
            offer.max_attempts
        } else {
            inner.cfg.max_attempts
        },
        state: TaskState::Queued as i32,
        worker: String::new(),
        tenant: s.meta.tenant.clone(),
        traceparent,
        result: None,
        offered_us: now_us(),
    };
    s.outstanding += 1;
    let refusal = if s.outstanding > 2 * inner.cfg.requester_window as usize {
        Some(status(
            Code::ResourceExhausted,
            format!(
                "{} tasks outstanding, the window is {}: wait for results",
                s.outstanding - 1,
                inner.cfg.requester_window
            ),
        ))
    } else if st.queued >= inner.cfg.max_queued {
        Some(status(
            Code::ResourceExhausted,
            format!("{} tasks queued, the limit: retry later", st.queued),
        ))
    } else if env.deadline_us > 0 && env.deadline_us <= now_us() {
        Some(status(
            Code::DeadlineExceeded,
            "deadline passed before the task was queued",
        ))
    } else {
        None
    };
    if let Some(refusal) = refusal {
        if refusal.code == Code::ResourceExhausted as i32 {
            inner
                .metrics
                .agent_credit_waits
                .get_or_create(&OutcomeLabels { outcome: "refused" })
                .inc();
        }
        rec.set_state(TaskState::Done);
        st.tasks.insert(
            rec.task_id.clone(),
            Task {
                rec: rec.clone(),
                orphaned_since: None,
            },
        );
        finish(inner, st, &rec.task_id, refusal, Bytes::new(), step);
        return;
    }
    step.put_task(&rec);
    st.lanes
        .entry(rec.capability.clone())
        .or_insert_with(|| Lanes::new(inner.cfg.aging))
        .push(priority, rec.task_id.clone(), Instant::now());
    st.queued += 1;
    st.tasks.insert(
        rec.task_id.clone(),
        Task {
            rec,
            orphaned_since: None,
        },
    );
    dispatch(inner, st, step);
}

fn on_result(inner: &Inner, st: &mut State, sid: &str, result: TaskResult, step: &mut Step) {
    let task_id = result.task_id.clone();
    if let Some(w) = st.sessions.get_mut(sid) {
        w.in_flight.remove(&task_id);
    }
    let Some(task) = st.tasks.get(&task_id) else {
        return;
    };
    if task.rec.state() == TaskState::Done {
        return;
    }
    let code = wire::code_of(&result.status);
    let retryable = matches!(code, Code::Unavailable | Code::Internal | Code::Unknown | Code::Aborted);
    if let Some(w) = st.sessions.get_mut(sid) {
        if retryable {
            w.breaker.failures += 1;
            if w.breaker.failures >= inner.cfg.breaker_failures {
                w.breaker.open_until = Some(Instant::now() + inner.cfg.breaker_cooldown);
                tracing::warn!(worker = sid, "circuit breaker open");
            }
        } else {
            w.breaker = Breaker::default();
        }
    }
    if retryable {
        requeue(
            inner,
            st,
            &task_id,
            result.status.map(|s| s.message).unwrap_or_default(),
            step,
        );
    } else {
        let status = result.status.unwrap_or_else(wire::ok_status);
        finish(inner, st, &task_id, status, Bytes::from(result.output), step);
    }
    dispatch(inner, st, step);
}

/// Puts an assigned task back in its lane, or dead-letters it after its last attempt.
fn requeue(inner: &Inner, st: &mut State, task_id: &str, why: String, step: &mut Step) {
    let Some(task) = st.tasks.get_mut(task_id) else {
        return;
    };
    // Only an assigned task goes back: a queued or finished one is where it belongs
    // (a late failure from a worker presumed dead must not queue it twice).
    if task.rec.state() != TaskState::Assigned {
        return;
    }
    if let Some(w) = st.sessions.get_mut(&task.rec.worker) {
        w.in_flight.remove(task_id);
    }
    if task.rec.attempts >= task.rec.max_attempts {
        let rec = task.rec.clone();
        step.ops.push(Op::Put {
            coll: coll::DEAD_LETTER.into(),
            key: task_id.to_string(),
            val: Bytes::from(rec.encode_to_vec()),
        });
        tracing::warn!(task = task_id, attempts = rec.attempts, reason = %why, "task dead-lettered");
        let msg = format!("dead-lettered after {} attempts; last failure: {why}", rec.attempts);
        finish(inner, st, task_id, status(Code::Aborted, msg), Bytes::new(), step);
        return;
    }
    task.rec.set_state(TaskState::Queued);
    task.rec.worker.clear();
    task.orphaned_since = None;
    step.put_task(&task.rec);
    let (cap, prio) = (task.rec.capability.clone(), task.rec.priority);
    st.lanes
        .entry(cap)
        .or_insert_with(|| Lanes::new(inner.cfg.aging))
        .push(prio, task_id.to_string(), Instant::now());
    st.queued += 1;
}

/// Records a task's outcome and queues the result for its requester.
fn finish(
    inner: &Inner,
    st: &mut State,
    task_id: &str,
    status: lattice_proto::google::rpc::Status,
    output: Bytes,
    step: &mut Step,
) {
    let Some(task) = st.tasks.get_mut(task_id) else {
        return;
    };
    let outcome = code_name(Code::from_i32(status.code));
    inner
        .metrics
        .agent_tasks
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    if task.rec.offered_us > 0 {
        inner
            .metrics
            .agent_task_duration
            .observe((now_us() - task.rec.offered_us).max(0) as f64 / 1e6);
    }
    if task.rec.state() == TaskState::Queued {
        st.queued = st.queued.saturating_sub(1);
    }
    let worker = std::mem::take(&mut task.rec.worker);
    task.rec.set_state(TaskState::Done);
    let result = TaskResult {
        task_id: task_id.to_string(),
        output: output.to_vec(),
        status: Some(status),
        attempts: task.rec.attempts,
        worker_id: worker.clone(),
        route: String::new(),
    };
    task.rec.result = Some(result.clone());
    // The record keeps the result until the requester acknowledges it, so a
    // restart resends it rather than rerunning the task.
    task.rec.payload = Bytes::new();
    step.put_task(&task.rec);
    let requester = task.rec.requester.clone();
    if let Some(w) = st.sessions.get_mut(&worker) {
        w.in_flight.remove(task_id);
    }
    if let Some(r) = st.sessions.get_mut(&requester) {
        push_frame(r, step, wire::envelope(task_id), agent_response::Body::Result(result));
    }
}

fn cancel_task(inner: &Inner, st: &mut State, task_id: &str, reason: &str, step: &mut Step) {
    let Some(task) = st.tasks.get(task_id) else {
        return;
    };
    if task.rec.state() == TaskState::Assigned {
        let worker = task.rec.worker.clone();
        if let Some(w) = st.sessions.get_mut(&worker) {
            push_frame(
                w,
                step,
                wire::envelope(task_id),
                agent_response::Body::Cancel(Cancel {
                    task_id: task_id.to_string(),
                    reason: reason.to_string(),
                    grace_ms: 0,
                }),
            );
        }
        inner.tools.cancel_task(task_id);
    }
    if task.rec.state() != TaskState::Done {
        let msg = if reason.is_empty() {
            "cancelled by the requester".to_string()
        } else {
            reason.to_string()
        };
        finish(inner, st, task_id, status(Code::Cancelled, msg), Bytes::new(), step);
    }
}

/// The agent said goodbye: cancel what it offered and forget the session.
fn end_session(inner: &Inner, st: &mut State, sid: &str, step: &mut Step) {
    let offered: Vec<String> = st
        .tasks
        .values()
        .filter(|t| t.rec.requester == sid)
        .map(|t| t.rec.task_id.clone())
        .collect();
    for id in &offered {
        cancel_task(inner, st, id, "the requester ended its session", step);
    }
    let running: Vec<String> = st
        .sessions
        .get(sid)
        .map(|s| s.in_flight.iter().cloned().collect())
        .unwrap_or_default();
    for id in running {
        requeue(inner, st, &id, "the worker ended its session".into(), step);
    }
    forget_session(st, sid, step);
    dispatch(inner, st, step);
}

fn forget_session(st: &mut State, sid: &str, step: &mut Step) {
    if let Some(s) = st.sessions.remove(sid) {
        for (seq, _) in s.outbox.pending() {
            step.ops.push(Op::Del {
                coll: coll::outbox(sid),
                key: seq_key(*seq),
            });
        }
        s.wake.notify_one();
    }
    let owned: Vec<String> = st
        .tasks
        .values()
        .filter(|t| t.rec.requester == sid)
        .map(|t| t.rec.task_id.clone())
        .collect();
    for id in owned {
        if let Some(t) = st.tasks.remove(&id) {
            if t.rec.state() == TaskState::Queued {
                st.queued = st.queued.saturating_sub(1);
            }
        }
        step.ops.push(Op::Del {
            coll: coll::tasks(sid),
            key: id,
        });
    }
    step.ops.push(Op::Del {
        coll: coll::SESSIONS.into(),
        key: sid.to_string(),
    });
}

/// Frames the agent acknowledged: a delivered result ends its task's life.
fn on_acked(_inner: &Inner, st: &mut State, sid: &str, acked: Vec<(u64, Pending)>, step: &mut Step) {
    for (seq, p) in acked {
        step.ops.push(Op::Del {
            coll: coll::outbox(sid),
            key: seq_key(seq),
        });
        if let Some(agent_response::Body::Result(r)) = p.frame.body {
            if let Some(t) = st.tasks.remove(&r.task_id) {
                step.ops.push(Op::Del {
                    coll: coll::tasks(&t.rec.requester),
                    key: r.task_id,
                });
            }
            if let Some(s) = st.sessions.get_mut(sid) {
                s.outstanding = s.outstanding.saturating_sub(1);
            }
        }
    }
}

/// Assigns queued tasks to workers with room, least loaded first.
fn dispatch(inner: &Inner, st: &mut State, step: &mut Step) {
    if st.queued == 0 {
        return;
    }
    let now = Instant::now();
    let caps: Vec<String> = st
        .lanes
        .iter()
        .filter(|(_, l)| !l.is_empty())
        .map(|(c, _)| c.clone())
        .collect();
    for cap in caps {
        loop {
            let worker = st
                .sessions
                .values()
                .filter(|s| s.can_take(now) && s.meta.capabilities.contains(&cap))
                .min_by(|a, b| {
                    let la = a.in_flight.len() as f64 / f64::from(a.meta.max_in_flight.max(1));
                    let lb = b.in_flight.len() as f64 / f64::from(b.meta.max_in_flight.max(1));
                    la.total_cmp(&lb)
                })
                .map(|s| s.meta.session_id.clone());
            let Some(worker) = worker else { break };
            let Some(task_id) = next_queued(st, &cap, now) else {
                break;
            };
            let task = st.tasks.get_mut(&task_id).expect("next_queued checked");
            if task.rec.deadline_us > 0 && task.rec.deadline_us <= now_us() {
                st.queued = st.queued.saturating_sub(1);
                task.rec.set_state(TaskState::Assigned);
                finish(
                    inner,
                    st,
                    &task_id,
                    status(Code::DeadlineExceeded, "deadline passed while queued"),
                    Bytes::new(),
                    step,
                );
                continue;
            }
            st.queued = st.queued.saturating_sub(1);
            task.rec.set_state(TaskState::Assigned);
            task.rec.worker = worker.clone();
            task.rec.attempts += 1;
            step.put_task(&task.rec);
            if task.rec.attempts == 1 && task.rec.offered_us > 0 {
                inner
                    .metrics
                    .agent_dispatch
                    .observe((now_us() - task.rec.offered_us).max(0) as f64 / 1e6);
            }
            let rec = task.rec.clone();
            let w = st.sessions.get_mut(&worker).expect("chosen above");
            w.in_flight.insert(task_id.clone());
            let mut env = wire::envelope(&task_id);
            env.deadline_us = rec.deadline_us;
            env.traceparent = rec.traceparent.clone();
            env.idempotency_key = task_id.clone();
            push_frame(
                w,
                step,
                env,
                agent_response::Body::Assign(TaskAssign {
                    task_id,
                    capability: rec.capability,
                    payload: rec.payload.to_vec(),
                    priority: rec.priority as i32,
                    attempt: rec.attempts,
                    tenant: rec.tenant,
                    route: rec.requester,
                }),
            );
        }
    }
}

fn next_queued(st: &mut State, cap: &str, now: Instant) -> Option<String> {
    let lanes = st.lanes.get_mut(cap)?;
    while let Some(id) = lanes.pop(now) {
        // Lanes are cleaned lazily: a cancelled or reassigned id may still sit there.
        if st.tasks.get(&id).is_some_and(|t| t.rec.state() == TaskState::Queued) {
            return Some(id);
        }
    }
    None
}

/// Sends the session's frames once durable, its acks, and heartbeats.
async fn writer_task(inner: Arc<Inner>, sid: String, epoch: u64, tx: mpsc::Sender<Result<AgentResponse, Status>>) {
    let mut heartbeat = tokio::time::interval(inner.cfg.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acked_sent = 0u64;
    let wake = match inner.state.lock().sessions.get(&sid) {
        Some(s) => s.wake.clone(),
        None => return,
    };
    loop {
        let (control, frames, ack, ack_ticket) = {
            let mut st = inner.state.lock();
            let Some(s) = st.sessions.get_mut(&sid) else { return };
            if s.attached != Some(epoch) {
                return;
            }
            let control: Vec<AgentResponse> = s.control.drain(..).collect();
            let cursor = s.cursor;
            let frames: Vec<Pending> = s.outbox.after(cursor).take(512).map(|(_, p)| p.clone()).collect();
            if let Some(last) = frames.last() {
                s.cursor = last.frame.env.as_ref().map_or(cursor, |e| e.seq_no);
            }
            (control, frames, s.completed_hwm(), s.in_ticket)
        };
        if control.is_empty() && frames.is_empty() && ack <= acked_sent {
            tokio::select! {
                () = wake.notified() => continue,
                _ = heartbeat.tick() => {
                    let (echo, in_flight) = {
                        let st = inner.state.lock();
                        st.sessions.get(&sid).map_or((0, 0), |s| (s.last_echo_us, s.in_flight.len()))
                    };
                    let hb = Heartbeat { sent_at_us: now_us(), echo_sent_at_us: echo, in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX), ..Heartbeat::default() };
                    if tx.send(Ok(wire::response(wire::envelope(""), agent_response::Body::Heartbeat(hb)))).await.is_err() {
                        return;
                    }
                    continue;
                }
                () = tx.closed() => return,
            }
        }
        let wait_for = frames.iter().map(|p| p.ticket).max().unwrap_or(0).max(ack_ticket);
        inner.store.durable(wait_for).await;
        for mut c in control {
            if let Some(env) = c.env.as_mut() {
                env.ack_seq = ack;
            }
            if tx.send(Ok(c)).await.is_err() {
                return;
            }
        }
        let any_frames = !frames.is_empty();
        for p in frames {
            let mut f = p.frame;
            if let Some(body) = &f.body {
                inner
                    .metrics
                    .agent_frames
                    .get_or_create(&FrameLabels {
                        direction: "out",
                        kind: wire::response_kind(body),
                    })
                    .inc();
            }
            if let Some(env) = f.env.as_mut() {
                env.ack_seq = ack;
                env.sent_at_us = now_us();
            }
            if tx.send(Ok(f)).await.is_err() {
                return;
            }
        }
        if !any_frames && ack > acked_sent {
            let mut env = wire::envelope("");
            env.ack_seq = ack;
            let frame = wire::response(env, agent_response::Body::Ack(lattice_proto::agent::Ack {}));
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
        }
        acked_sent = acked_sent.max(ack);
    }
}

/// Reassigns the tasks of workers gone too long, expires queued tasks past their
/// deadline, and forgets idle sessions.
async fn sweep_task(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.draining.is_cancelled() {
            // A draining replica stops acting on shared state: its agents are
            // resuming elsewhere and the new owner decides for them.
            return;
        }
        let now = Instant::now();
        let mut st = inner.state.lock();
        if inner.draining.is_cancelled() {
            return;
        }
        let mut step = Step::default();
        let gone: Vec<(String, String)> = st
            .sessions
            .values()
            .filter(|s| s.detached_since.is_some_and(|t| now - t >= inner.cfg.reassign_after))
            .flat_map(|s| s.in_flight.iter().map(|id| (s.meta.session_id.clone(), id.clone())))
            .chain(
                st.tasks
                    .values()
                    .filter(|t| t.orphaned_since.is_some_and(|o| now - o >= inner.cfg.reassign_after))
                    .map(|t| (t.rec.worker.clone(), t.rec.task_id.clone())),
            )
            .collect();
        for (worker, id) in gone {
            // Only if the task is still that worker's; another may have taken it.
            if st.tasks.get(&id).is_some_and(|t| t.rec.worker == worker) {
                requeue(&inner, &mut st, &id, "its worker disconnected".into(), &mut step);
            } else if let Some(w) = st.sessions.get_mut(&worker) {
                w.in_flight.remove(&id);
            }
        }
        let expired: Vec<String> = st
            .tasks
            .values()
            .filter(|t| t.rec.state() == TaskState::Queued && t.rec.deadline_us > 0 && t.rec.deadline_us <= now_us())
            .map(|t| t.rec.task_id.clone())
            .collect();
        for id in expired {
            finish(
                &inner,
                &mut st,
                &id,
                status(Code::DeadlineExceeded, "deadline passed while queued"),
                Bytes::new(),
                &mut step,
            );
        }
        let idle: Vec<String> = st
            .sessions
            .values()
            .filter(|s| {
                s.detached_since
                    .is_some_and(|t| now - t >= inner.cfg.session_idle_timeout)
            })
            .map(|s| s.meta.session_id.clone())
            .collect();
        for sid in idle {
            tracing::info!(session = %sid, "idle session evicted");
            end_session(&inner, &mut st, &sid, &mut step);
        }
        // Lanes are cleaned lazily on pop; without workers for a capability, churn
        // (offers cancelled or expired while queued) would grow them unbounded.
        let State {
            lanes, tasks, queued, ..
        } = &mut *st;
        let total: usize = lanes.values().map(Lanes::len).sum();
        if total > 2 * *queued + 1024 {
            for lane in lanes.values_mut() {
                lane.retain(|id| tasks.get(id).is_some_and(|t| t.rec.state() == TaskState::Queued));
            }
        }
        dispatch(&inner, &mut st, &mut step);
        if !step.ops.is_empty() || !step.wake.is_empty() {
            commit(&inner, &mut st, step);
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
        let tenant = request
            .metadata()
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("default")
            .to_string();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(self.clone().serve_stream(request.into_inner(), tx, tenant));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The lower-case name of a gRPC code, as metric label.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}
