//! The agent side of `NegotiateTask`, as a library other services can embed
//! (`lattice agent` and `lattice chat` use it).
//!
//! [`AgentClient::connect`] returns at once; a supervisor task owns the stream:
//! it connects (rotating through the configured orchestrators), says hello
//! (resuming the session after the first time), resends every frame the
//! orchestrator has not acknowledged, dedupes what arrives, and on a cut, a missed
//! heartbeat or a `Drain` reconnects with exponential backoff and full jitter
//! (100 ms initial, 5 s cap). [`AgentClient::send`] waits while the outbox is full,
//! so a stalled orchestrator holds the application back instead of growing memory.

use std::{collections::HashSet, future::Future, io, pin::Pin, sync::Arc, time::Duration};

use lattice_proto::agent::{
    agent_coordination_client::AgentCoordinationClient, agent_message, agent_response, AgentMessage, AgentResponse,
    Drain, Envelope, Goodbye, Heartbeat, Hello, Resume, ResumeResult,
};
use parking_lot::Mutex;
use tokio::io::DuplexStream;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Uri},
    Request,
};

use crate::{
    session::{Inbox, Outbox, Verdict},
    wire::{self, now_us},
};

/// TLS to the orchestrator, for `https://` endpoints.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// PEM CA certificates the orchestrator's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// PEM certificate chain and key presented to a port that requires client
    /// certificates (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the orchestrator's certificate must carry, when it differs from
    /// the endpoint's host.
    pub domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ClientTls")
            .field("identity", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    fn tonic(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        c
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<DuplexStream>> + Send>>;

/// Opens an in-process connection to an orchestrator served in the same process
/// (the server's REST task gateway), in place of dialling the endpoint.
#[derive(Clone)]
pub struct Connector(Arc<dyn Fn() -> ConnectFuture + Send + Sync>);

impl Connector {
    pub fn new<F, Fut>(f: F) -> Connector
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<DuplexStream>> + Send + 'static,
    {
        Connector(Arc::new(move || Box::pin(f())))
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Orchestrator URLs (`http://host:port`, or `https://` with [`ClientConfig::tls`]),
    /// tried in turn.
    pub endpoints: Vec<String>,
    /// TLS settings for `https://` endpoints.
    pub tls: Option<ClientTls>,
    /// Set, connections are opened by it instead of over the network.
    pub connector: Option<Connector>,
    pub agent_id: String,
    pub tenant: String,
    /// Capabilities served as a worker; empty for a requester.
    pub capabilities: Vec<String>,
    /// Tasks the orchestrator may assign at once.
    pub max_in_flight: u32,
    pub auth_token: Option<String>,
    /// Extra request metadata, e.g. region.
    pub metadata: Vec<(String, String)>,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Connect plus hello/welcome must finish within this.
    pub handshake_timeout: Duration,
    /// Unacknowledged frames kept for resend; `send` waits beyond this.
    pub outbox_capacity: usize,
    /// Frames delivered to the application and not yet taken.
    pub event_capacity: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: vec!["http://127.0.0.1:8001".into()],
            tls: None,
            connector: None,
            agent_id: format!("agent-{}", std::process::id()),
            tenant: "default".into(),
            capabilities: Vec::new(),
            max_in_flight: 16,
            auth_token: None,
            metadata: Vec::new(),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            outbox_capacity: 4096,
            event_capacity: 1024,
        }
    }
}

/// Lifecycle of the link, observable through [`AgentClient::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    Established {
        session_id: String,
        orchestrator_id: String,
        resumed: bool,
    },
    Reconnecting {
        attempt: u32,
    },
    Disconnected,
}

/// What the application receives: deduplicated reliable frames in order, and
/// advisory ones (progress, drain notices).
#[derive(Debug)]
pub enum Event {
    Frame(Box<AgentResponse>),
    Drain(Drain),
    /// The session was gone when the agent came back (GAP, e.g. it was idle past
    /// the orchestrator's session timeout): this offer had been accepted by the old
    /// session and its result will never come. Offers not yet accepted are resent.
    Lost {
        task_id: String,
    },
}

/// Per-frame options of [`AgentClient::send`].
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    pub priority: i32,
    pub deadline_us: i64,
    pub idempotency_key: String,
    pub correlation_id: String,
    pub traceparent: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the client was closed")]
    Closed,
}

#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ClientConfig,
    outbox: Mutex<Outbox<AgentMessage>>,
    room: Semaphore,
    /// Credits for task offers: the orchestrator's window (Welcome.max_in_flight),
    /// taken per offer and given back when its result arrives.
    offer_room: Semaphore,
    /// Whether `offer_room` was sized from a Welcome yet.
    window_known: std::sync::atomic::AtomicBool,
    /// Task ids offered whose result has not arrived, for GAP accounting.
    offered: Mutex<std::collections::HashSet<String>>,
    wake: Notify,
    inbox: Mutex<Inbox>,
    session: Mutex<Option<(String, u64)>>,
    running: Mutex<HashSet<String>>,
    state: watch::Sender<LinkState>,
    /// Highest orchestrator seq handed to the application; acks go up to it.
    delivered: Mutex<u64>,
    shutdown: CancellationToken,
    reconnects: std::sync::atomic::AtomicU64,
    drains: std::sync::atomic::AtomicU64,
    /// Set by `close`: send Goodbye (with this cancel_pending flag) and stop.
    goodbye: Mutex<Option<bool>>,
    /// Cancelled once the Goodbye frame is on the wire.
    bye_sent: CancellationToken,
}

impl AgentClient {
    /// Starts the supervisor; returns the handle and the event stream.
    pub fn connect(cfg: ClientConfig) -> (AgentClient, mpsc::Receiver<Event>) {
        let (events_tx, events_rx) = mpsc::channel(cfg.event_capacity.max(1));
        let inner = Arc::new(Inner {
            room: Semaphore::new(cfg.outbox_capacity.max(1)),
            offer_room: Semaphore::new(0),
            window_known: std::sync::atomic::AtomicBool::new(false),
            offered: Mutex::new(std::collections::HashSet::new()),
            cfg,
            outbox: Mutex::new(Outbox::new(1)),
            wake: Notify::new(),
            inbox: Mutex::new(Inbox::new(0, Duration::from_secs(600), 65_536)),
            session: Mutex::new(None),
            running: Mutex::new(HashSet::new()),
            state: watch::channel(LinkState::Connecting).0,
            delivered: Mutex::new(0),
            shutdown: CancellationToken::new(),
            reconnects: std::sync::atomic::AtomicU64::new(0),
            drains: std::sync::atomic::AtomicU64::new(0),
            goodbye: Mutex::new(None),
            bye_sent: CancellationToken::new(),
        });
        tokio::spawn(supervise(inner.clone(), events_tx));
        (AgentClient { inner }, events_rx)
    }

    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.inner.state.subscribe()
    }

    /// Waits until the link is established (or the client is closed).
    pub async fn established(&self) -> Result<String, ClientError> {
        let mut rx = self.state();
        let s = rx
            .wait_for(|s| matches!(s, LinkState::Established { .. } | LinkState::Disconnected))
            .await
            .map_err(|_| ClientError::Closed)?;
        match &*s {
            LinkState::Established { session_id, .. } => Ok(session_id.clone()),
            _ => Err(ClientError::Closed),
        }
    }

    pub fn session_id(&self) -> Option<String> {
        self.inner.session.lock().as_ref().map(|(s, _)| s.clone())
    }

    /// Times the link was re-established after the first time.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `Drain` frames received (the orchestrator asked this agent to move).
    pub fn drains(&self) -> u64 {
        self.inner.drains.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Frames sent and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.inner.outbox.lock().len()
    }

    /// Queues a reliable frame; waits while the outbox is full. Returns its seq.
    pub async fn send(&self, body: agent_message::Body, opts: SendOptions) -> Result<u64, ClientError> {
        let offered = match &body {
            agent_message::Body::Offer(o) => Some(o.task_id.clone()),
            _ => None,
        };
        if offered.is_some() {
            let credit = tokio::select! {
                p = self.inner.offer_room.acquire() => p.map_err(|_| ClientError::Closed)?,
                () = self.inner.shutdown.cancelled() => return Err(ClientError::Closed),
            };
            // Given back when the task's result arrives.
            credit.forget();
        }
        let permit = tokio::select! {
            p = self.inner.room.acquire() => p.map_err(|_| ClientError::Closed)?,
            () = self.inner.shutdown.cancelled() => return Err(ClientError::Closed),
        };
        // Returned when the orchestrator acknowledges the frame.
        permit.forget();
        let agent_id = self.inner.cfg.agent_id.clone();
        let mut outbox = self.inner.outbox.lock();
        // Recorded as offered together with entering the outbox (the handshake takes
        // the same locks in the same order): a session lost in between must not
        // count an offer it never saw as accepted, and so lost.
        if let Some(task_id) = offered {
            self.inner.offered.lock().insert(task_id);
        }
        let (seq, _) = outbox.push(|seq| AgentMessage {
            agent_id,
            priority: opts.priority,
            env: Some(Envelope {
                seq_no: seq,
                deadline_us: opts.deadline_us,
                idempotency_key: opts.idempotency_key,
                correlation_id: opts.correlation_id.clone(),
                traceparent: opts.traceparent,
                ..wire::envelope(&opts.correlation_id)
            }),
            body: Some(body),
            ..AgentMessage::default()
        });
        drop(outbox);
        self.inner.wake.notify_one();
        Ok(seq)
    }

    /// Marks a task as running here (reported on resume) or finished.
    pub fn set_running(&self, task_id: &str, running: bool) {
        let mut r = self.inner.running.lock();
        if running {
            r.insert(task_id.to_string());
        } else {
            r.remove(task_id);
        }
    }

    /// Waits until every frame sent so far is acknowledged, or `timeout` passes.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.unacked() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Ends the session: `Goodbye` (cancelling pending tasks if asked), then close.
    pub async fn close(&self, cancel_pending: bool) {
        let _ = self.flush(Duration::from_secs(5)).await;
        *self.inner.goodbye.lock() = Some(cancel_pending);
        self.inner.wake.notify_one();
        let mut rx = self.state();
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|s| *s == LinkState::Disconnected)).await;
        self.inner.shutdown.cancel();
    }

    /// Drops the link without a goodbye, as a crash would (tests use it).
    pub fn abort(&self) {
        self.inner.shutdown.cancel();
    }
}

enum Ended {
    Drain(Duration),
    Goodbye,
    Shutdown,
}

async fn supervise(inner: Arc<Inner>, events: mpsc::Sender<Event>) {
    let mut attempt: u32 = 0;
    let mut idx = 0usize;
    let mut ever = false;
    loop {
        if inner.shutdown.is_cancelled() {
            break;
        }
        let endpoint = inner.cfg.endpoints[idx % inner.cfg.endpoints.len().max(1)].clone();
        match run_once(&inner, &endpoint, &events, &mut ever).await {
            Ok(Ended::Goodbye | Ended::Shutdown) => break,
            Ok(Ended::Drain(after)) => {
                idx += 1;
                attempt = 0;
                inner.state.send_replace(LinkState::Reconnecting { attempt: 0 });
                tokio::select! {
                    () = tokio::time::sleep(after) => {}
                    () = inner.shutdown.cancelled() => break,
                }
            }
            Err((established, e)) => {
                if established {
                    attempt = 0;
                }
                tracing::debug!(endpoint = %endpoint, error = %e, "agent link lost");
                idx += 1;
                attempt += 1;
                inner.state.send_replace(LinkState::Reconnecting { attempt });
                // Full jitter keeps a fleet of agents from reconnecting in lockstep.
                let cap = inner
                    .cfg
                    .initial_backoff
                    .saturating_mul(1u32 << attempt.min(16).saturating_sub(1))
                    .min(inner.cfg.max_backoff);
                let wait = cap.mul_f64(fastrand::f64());
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = inner.shutdown.cancelled() => break,
                }
            }
        }
    }
    inner.state.send_replace(LinkState::Disconnected);
}

/// Why one stream to an orchestrator ended or never started; the link reconnects
/// either way, and logs this.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("{0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Refused(tonic::Status),
    #[error("channel closed")]
    Closed,
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("expected welcome, got {0:?}")]
    NoWelcome(Option<agent_response::Body>),
    #[error("no frame within three heartbeat intervals")]
    Silent,
    #[error("stream failed: {0}")]
    Stream(tonic::Status),
    #[error("stream ended")]
    Ended,
    #[error("bad frame from orchestrator: {0:?}")]
    BadFrame(crate::session::Verdict),
}

/// `(established, why)`: `established` is true once the handshake succeeded.
async fn run_once(
    inner: &Arc<Inner>,
    endpoint: &str,
    events: &mpsc::Sender<Event>,
    ever: &mut bool,
) -> Result<Ended, (bool, LinkError)> {
    let err = |e: tonic::transport::Error| (false, LinkError::from(e));
    let mut ep = Endpoint::from_shared(endpoint.to_string())
        .map_err(err)?
        .connect_timeout(inner.cfg.handshake_timeout)
        .tcp_nodelay(true)
        // Below common load-balancer idle timeouts (AWS ELB 60 s).
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if let Some(tls) = &inner.cfg.tls {
        ep = ep.tls_config(tls.tonic()).map_err(err)?;
    }
    let channel = match &inner.cfg.connector {
        None => ep.connect().await,
        Some(c) => {
            let c = c.clone();
            ep.connect_with_connector(tower::service_fn(move |_: Uri| {
                let open = (c.0)();
                async move { open.await.map(hyper_util::rt::TokioIo::new) }
            }))
            .await
        }
    }
    .map_err(err)?;
    let mut client = AgentCoordinationClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let (req_tx, req_rx) = mpsc::channel::<AgentMessage>(256);
    let resume = inner.session.lock().as_ref().map(|(sid, epoch)| Resume {
        session_id: sid.clone(),
        epoch: *epoch,
        last_received_seq: inner.inbox.lock().hwm(),
        running_task_ids: inner.running.lock().iter().cloned().collect(),
    });
    let hello = AgentMessage {
        agent_id: inner.cfg.agent_id.clone(),
        env: Some(wire::envelope("")),
        body: Some(agent_message::Body::Hello(Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            capabilities: inner.cfg.capabilities.clone(),
            max_in_flight: inner.cfg.max_in_flight,
            tenant: inner.cfg.tenant.clone(),
            resume,
        })),
        ..AgentMessage::default()
    };
    req_tx.send(hello).await.map_err(|_| (false, LinkError::Closed))?;
    let mut request = Request::new(ReceiverStream::new(req_rx));
    let md = request.metadata_mut();
    if let Some(token) = &inner.cfg.auth_token {
        if let Ok(v) = MetadataValue::try_from(format!("Bearer {token}")) {
            md.insert("authorization", v);
        }
    }
    if let Ok(v) = MetadataValue::try_from(inner.cfg.tenant.as_str()) {
        md.insert("x-tenant", v);
    }
    for (k, v) in &inner.cfg.metadata {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
            MetadataValue::try_from(v.as_str()),
        ) {
            md.insert(k, v);
        }
    }
    let handshake = async {
        let mut stream = client.negotiate_task(request).await?.into_inner();
        let first = stream.message().await?;
        Ok::<_, tonic::Status>((stream, first))
    };
    let (mut stream, first) = tokio::time::timeout(inner.cfg.handshake_timeout, handshake)
        .await
        .map_err(|_| (false, LinkError::HandshakeTimeout))?
        .map_err(|s| (false, LinkError::Refused(s)))?;
    let welcome = match first.and_then(|f| f.body) {
        Some(agent_response::Body::Welcome(w)) => w,
        other => return Err((false, LinkError::NoWelcome(other))),
    };
    let resumed = welcome.result == ResumeResult::Resumed as i32;
    let mut lost = Vec::new();
    {
        let mut outbox = inner.outbox.lock();
        if resumed {
            let freed = outbox.ack(welcome.last_received_seq).len();
            inner.room.add_permits(freed);
        } else {
            // A new session: the orchestrator knows none of our seqs or theirs.
            outbox.renumber(|frame, seq| {
                if let Some(env) = frame.env.as_mut() {
                    env.seq_no = seq;
                }
            });
            *inner.inbox.lock() = Inbox::new(0, Duration::from_secs(600), 65_536);
            *inner.delivered.lock() = 0;
            // Offers the old session accepted (no longer in the outbox) are lost
            // with it: say so, and give their credit back.
            let unsent: std::collections::HashSet<&str> = outbox
                .pending()
                .filter_map(|(_, f)| match &f.body {
                    Some(agent_message::Body::Offer(o)) => Some(o.task_id.as_str()),
                    _ => None,
                })
                .collect();
            let mut offered = inner.offered.lock();
            lost = offered
                .iter()
                .filter(|id| !unsent.contains(id.as_str()))
                .cloned()
                .collect();
            for id in &lost {
                offered.remove(id);
            }
        }
    }
    if !lost.is_empty() && inner.window_known.load(std::sync::atomic::Ordering::Acquire) {
        inner.offer_room.add_permits(lost.len());
    }
    for task_id in lost {
        let _ = events.send(Event::Lost { task_id }).await;
    }
    if !inner.window_known.swap(true, std::sync::atomic::Ordering::AcqRel) {
        inner.offer_room.add_permits(welcome.max_in_flight.max(1) as usize);
    }
    *inner.session.lock() = Some((welcome.session_id.clone(), welcome.epoch));
    if *ever {
        inner.reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    *ever = true;
    inner.state.send_replace(LinkState::Established {
        session_id: welcome.session_id.clone(),
        orchestrator_id: welcome.orchestrator_id.clone(),
        resumed,
    });
    let heartbeat = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    let link = CancellationToken::new();
    let last_echo = Arc::new(Mutex::new(0i64));
    let sender = tokio::spawn(sender_task(
        inner.clone(),
        req_tx,
        heartbeat,
        link.clone(),
        last_echo.clone(),
    ));
    let outcome = receive(inner, &mut stream, events, heartbeat * 3, &last_echo).await;
    link.cancel();
    let _ = sender.await;
    outcome.map_err(|e| (true, e))
}

async fn receive(
    inner: &Arc<Inner>,
    stream: &mut tonic::Streaming<AgentResponse>,
    events: &mpsc::Sender<Event>,
    miss: Duration,
    last_echo: &Mutex<i64>,
) -> Result<Ended, LinkError> {
    loop {
        let next = tokio::select! {
            r = tokio::time::timeout(miss, stream.message()) => r,
            () = inner.shutdown.cancelled() => return Ok(Ended::Shutdown),
            () = inner.bye_sent.cancelled() => return Ok(Ended::Goodbye),
        };
        let frame = match next {
            Err(_) => return Err(LinkError::Silent),
            Ok(Err(s)) => return Err(LinkError::Stream(s)),
            Ok(Ok(None)) => return Err(LinkError::Ended),
            Ok(Ok(Some(f))) => f,
        };
        let env = frame.env.clone().unwrap_or_default();
        if env.ack_seq > 0 {
            let freed = inner.outbox.lock().ack(env.ack_seq).len();
            inner.room.add_permits(freed);
        }
        let Some(body) = &frame.body else { continue };
        if !wire::is_reliable_response(body) {
            match body {
                agent_response::Body::Heartbeat(hb) => *last_echo.lock() = hb.sent_at_us,
                agent_response::Body::Drain(d) => {
                    inner.drains.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let after = Duration::from_millis(u64::from(d.reconnect_after_ms));
                    let _ = events.try_send(Event::Drain(d.clone()));
                    return Ok(Ended::Drain(after));
                }
                agent_response::Body::Progress(_) => {
                    let _ = events.try_send(Event::Frame(Box::new(frame)));
                }
                agent_response::Body::Error(e) => {
                    tracing::warn!(code = e.code, message = %e.message, "orchestrator error")
                }
                _ => {}
            }
            continue;
        }
        let verdict = inner.inbox.lock().check(env.seq_no, &env.msg_id, env.sent_at_us);
        match verdict {
            Verdict::New => {
                // Acknowledged from here on: the frame is the application's. The
                // ack rides on the next frame out, so an offer made in answer to a
                // result carries the ack that frees the orchestrator's window first.
                *inner.delivered.lock() = env.seq_no;
                if let agent_response::Body::Result(r) = body {
                    // A result for an offer this client did not make (or already
                    // wrote off) returns no credit.
                    if inner.offered.lock().remove(&r.task_id) {
                        inner.offer_room.add_permits(1);
                    }
                }
                inner.wake.notify_one();
                // A full event queue holds the stream: the orchestrator sees no ack
                // and keeps the frames, bounded by its own window.
                if events.send(Event::Frame(Box::new(frame))).await.is_err() {
                    return Ok(Ended::Shutdown);
                }
            }
            Verdict::Duplicate => {
                *inner.delivered.lock() = inner.inbox.lock().hwm();
                inner.wake.notify_one();
            }
            Verdict::Skewed | Verdict::Gap { .. } => return Err(LinkError::BadFrame(verdict)),
        }
    }
}

async fn sender_task(
    inner: Arc<Inner>,
    tx: mpsc::Sender<AgentMessage>,
    heartbeat: Duration,
    link: CancellationToken,
    last_echo: Arc<Mutex<i64>>,
) {
    let mut cursor = 0u64;
    let mut acked = 0u64;
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let delivered = *inner.delivered.lock();
        let frames: Vec<AgentMessage> = inner
            .outbox
            .lock()
            .after(cursor)
            .take(256)
            .map(|(_, f)| f.clone())
            .collect();
        let goodbye = *inner.goodbye.lock();
        if let Some(cancel_pending) = goodbye {
            let bye = AgentMessage {
                agent_id: inner.cfg.agent_id.clone(),
                env: Some(wire::envelope("")),
                body: Some(agent_message::Body::Goodbye(Goodbye {
                    reason: "closing".into(),
                    cancel_pending,
                })),
                ..AgentMessage::default()
            };
            let _ = tx.send(bye).await;
            inner.bye_sent.cancel();
            return;
        }
        if frames.is_empty() && delivered <= acked {
            tokio::select! {
                () = inner.wake.notified() => continue,
                () = link.cancelled() => return,
                _ = tick.tick() => {
                    let hb = AgentMessage {
                        agent_id: inner.cfg.agent_id.clone(),
                        env: Some(Envelope { ack_seq: delivered, ..wire::envelope("") }),
                        body: Some(agent_message::Body::Heartbeat(Heartbeat {
                            sent_at_us: now_us(),
                            echo_sent_at_us: *last_echo.lock(),
                            in_flight: u32::try_from(inner.running.lock().len()).unwrap_or(u32::MAX),
                            ..Heartbeat::default()
                        })),
                        ..AgentMessage::default()
                    };
                    if tx.send(hb).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        if frames.is_empty() {
            let ack = AgentMessage {
                agent_id: inner.cfg.agent_id.clone(),
                env: Some(Envelope {
                    ack_seq: delivered,
                    ..wire::envelope("")
                }),
                body: Some(agent_message::Body::Ack(lattice_proto::agent::Ack {})),
                ..AgentMessage::default()
            };
            if tx.send(ack).await.is_err() {
                return;
            }
        }
        let mut delivered = delivered;
        for mut f in frames {
            if let Some(env) = f.env.as_mut() {
                cursor = env.seq_no;
                delivered = *inner.delivered.lock();
                env.ack_seq = delivered;
            }
            tokio::select! {
                r = tx.send(f) => if r.is_err() { return },
                () = link.cancelled() => return,
            }
        }
        acked = delivered;
    }
}
