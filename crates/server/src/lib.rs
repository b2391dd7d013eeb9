//! The edge of Lattice: the Open Inference Protocol v2 over REST ([`http`]) and gRPC
//! ([`grpc`]), the error table ([`error`]), a metrics endpoint and graceful shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind port 0
//! and production passes SIGTERM.

pub mod audit;
pub mod auth;
pub mod body;
pub mod canary;
pub mod conn;
pub mod edge_metrics;
pub mod embeddings;
pub mod encoding;
pub mod error;
pub mod exposition;
pub mod gateway;
pub mod grpc;
pub mod health;
pub mod http;
pub mod jetstream;
pub mod json;
pub mod limit;
pub mod load_params;
pub mod observe;
pub mod podcost;
pub mod replica_signals;
pub mod scaler;
pub mod scaling;
pub mod shm;
pub mod tasks;
pub mod tls;
pub mod tools_api;
pub mod watch;

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use lattice_inference::ModelRepository;
use lattice_proto::{
    agent::{agent_coordination_server::AgentCoordinationServer, chat_server::ChatServer},
    inference::grpc_inference_service_server::GrpcInferenceServiceServer,
};
use tokio::net::TcpListener;
pub use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;

pub const SERVER_NAME: &str = "lattice";

/// Protocol extensions advertised in server metadata.
pub const EXTENSIONS: &[&str] = &[
    "binary_tensor_data",
    "model_repository",
    "sequence",
    "schedule_policy",
    "statistics",
    "model_configuration",
    "system_shared_memory",
];

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest accepted request body (REST) or message (gRPC), in bytes.
    pub max_body_bytes: usize,
    /// Largest answer either protocol sends, in bytes; a request whose answer would
    /// be larger fails before it is encoded.
    pub max_response_bytes: usize,
    /// Connection limits and timeouts of the REST and gRPC ports.
    pub connections: conn::Limits,
    /// How long a REST task session with nothing waiting is kept.
    pub task_session_idle: Duration,
    /// The predictive scaling policy the KEDA external scaler serves.
    pub scaling: scaling::ScalingConfig,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub drain_timeout: Duration,
    /// Request spans and edge metrics on (the default) or off, for overhead benchmarks.
    pub telemetry: bool,
    /// This replica's index and the fleet size, for sharded warm-up, and the delay
    /// per index before loading starts (staggering a fleet that starts together).
    pub warmup: Warmup,
    /// Bounds of the system shared memory extension.
    pub shm: shm::Limits,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Warmup {
    pub replica_index: usize,
    pub replica_count: usize,
    pub stagger: Duration,
}

/// The agent plane served on the gRPC port beside inference.
#[derive(Clone)]
pub struct AgentPlane {
    pub orchestrator: lattice_agent::orchestrator::Orchestrator,
    pub chat: lattice_agent::chat::ChatService,
    /// The bearer token agent streams must carry (the REST task gateway's too).
    pub token: Option<String>,
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub repo: ModelRepository,
    /// Orchestrator, memory broker, tool gateway and chat, when enabled.
    pub agents: Option<AgentPlane>,
    pub cfg: Arc<ServerConfig>,
    ready: Arc<AtomicBool>,
    /// Cancelled when draining starts; streams end on it.
    pub shutdown: CancellationToken,
    /// Authentication, tenant limits, canary routing and the audit log, in front of
    /// every service ([`gateway`]); all off unless set with [`AppState::with_gateway`].
    pub gateway: Arc<gateway::Gateway>,
    /// `POST /v1/agents/tasks`, when the agent plane is on (set by [`run`], which
    /// knows the gRPC address).
    pub tasks: Option<Arc<tasks::TaskGateway>>,
    /// Arrivals counted at the edge and the scaling policy's decision.
    pub scaling: scaling::SharedSignals,
    /// Registered system shared-memory regions, shared by both protocols.
    pub shm: shm::Registry,
    /// TLS of the ports that have it ([`tls`]); none by default.
    pub tls: tls::Acceptors,
    /// The edge's metric set, registered in the repository's registry.
    pub edge: Arc<edge_metrics::EdgeMetrics>,
}

fn repo_metrics(repo: &ModelRepository) -> Arc<lattice_observability::Metrics> {
    repo.metrics().clone()
}

/// Registers every metric set the server exposes (the edge's, the inference
/// plane's, the agent plane's and the replica's scaling signals), so the exposition
/// and [`Metrics::declared_series`](lattice_observability::Metrics::declared_series)
/// name every family whether or not that plane runs.
pub fn register_metric_sets(metrics: &lattice_observability::Metrics) {
    metrics.set::<edge_metrics::EdgeMetrics>();
    metrics.set::<lattice_inference::ModelMetrics>();
    metrics.set::<lattice_agent::agent_metrics::AgentMetrics>();
    metrics.set::<replica_signals::ReplicaSignals>();
}

impl AppState {
    pub fn new(repo: ModelRepository, cfg: ServerConfig) -> AppState {
        register_metric_sets(repo.metrics());
        AppState {
            gateway: Arc::new(gateway::Gateway::off(repo_metrics(&repo))),
            edge: repo.metrics().set::<edge_metrics::EdgeMetrics>(),
            repo,
            agents: None,
            tasks: None,
            scaling: Arc::default(),
            shm: shm::Registry::new(cfg.shm.clone()),
            tls: tls::Acceptors::default(),
            cfg: Arc::new(cfg),
            ready: Arc::new(AtomicBool::new(false)),
            shutdown: CancellationToken::new(),
        }
    }

    pub fn with_agents(mut self, agents: AgentPlane) -> AppState {
        self.agents = Some(agents);
        self
    }

    pub fn with_tls(mut self, tls: tls::Acceptors) -> AppState {
        self.tls = tls;
        self
    }

    pub fn with_gateway(mut self, gateway: gateway::Gateway) -> AppState {
        self.gateway = Arc::new(gateway);
        self
    }

    /// Takes a token from the tenant's buckets for one request of a stream (the
    /// gateway admitted the stream itself), if limiting is on.
    pub fn admit(&self, tenant: Option<&str>) -> Result<(), error::ApiError> {
        let tenant = tenant.filter(|t| !t.is_empty()).unwrap_or("default");
        self.gateway.take_token(tenant)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}

pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
    pub metrics: TcpListener,
}

/// Serves until `shutdown` resolves, then drains.
///
/// Start-up order: listeners serve liveness at once; models load and warm up; only
/// then do readiness and gRPC health turn to SERVING. On shutdown readiness turns
/// false first, then the servers stop accepting and in-flight requests get
/// `drain_timeout` to finish.
pub async fn run(
    mut state: AppState,
    listeners: Listeners,
    load_models: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let token = state.shutdown.clone();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = health::Health::start(reporter, state.agents.is_some()).await;
    let infer = GrpcInferenceServiceServer::new(grpc::InferenceService { state: state.clone() })
        .max_decoding_message_size(state.cfg.max_body_bytes)
        // With the check before encoding, this only guards what that check misses.
        .max_encoding_message_size(state.cfg.max_response_bytes.saturating_add(64 * 1024))
        // Clients may compress requests (tritonclient's compression_algorithm); answers
        // are compressed only for clients that ask for it.
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Deflate);

    if let (Some(agents), Some(log)) = (&state.agents, state.gateway.audit()) {
        agents
            .orchestrator
            .set_task_audit(Arc::new(audit::tasks::TaskRecords(log.clone())));
    }
    // In-process connections to the gRPC port: the REST task gateway's hop.
    let (local_tx, local_rx) = tokio::sync::mpsc::channel(16);
    if state.agents.is_some() {
        // REST tasks enter through the orchestrator's gRPC service, as any agent's
        // do, over an in-process connection: it needs neither the port's TLS nor a
        // client certificate, and is not counted against the port's connections.
        // With authentication on, the hop carries the server's internal key, which
        // may act for the tenant the gateway verified on the REST request.
        let token = state
            .gateway
            .internal_key()
            .map(str::to_string)
            .or_else(|| state.agents.as_ref().and_then(|a| a.token.clone()));
        let gateway = tasks::TaskGateway::new(
            vec![tasks::LOCAL_ENDPOINT.to_string()],
            token,
            state.cfg.task_session_idle,
        )
        .with_connector(lattice_agent::client::Connector::new(move || {
            let tx = local_tx.clone();
            async move {
                let (client, server) = tokio::io::duplex(64 * 1024);
                tx.send(server)
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the gRPC server has stopped"))?;
                Ok(client)
            }
        }));
        let gateway = Arc::new(gateway);
        gateway.start_sweeper(state.shutdown.clone());
        state.tasks = Some(gateway);
    } else {
        drop(local_tx);
    }
    let grpc_token = token.clone();
    // Nagle's algorithm would hold small gRPC frames back ~40 ms behind delayed ACKs.
    // The builder's tcp_nodelay only covers listeners tonic binds itself.
    let limits = state.cfg.connections;
    let grpc_incoming = conn::incoming(listeners.grpc, limits, state.tls.grpc.clone(), local_rx);
    let grpc_server = tokio::spawn(
        tonic::transport::Server::builder()
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            .layer(observe::GrpcLayer {
                metrics: state.edge.clone(),
                enabled: state.cfg.telemetry,
            })
            .layer(state.gateway.layer(gateway::Protocol::Grpc))
            // Keepalive pings keep idle streams alive through load balancers, and keep
            // a live peer's connection busier than the idle timeout.
            .http2_keepalive_interval(Some(limits.ping_interval()))
            .add_service(health_service)
            .add_service(health::reflection_v1(state.agents.is_some())?)
            .add_service(health::reflection_v1alpha(state.agents.is_some())?)
            .add_service(infer)
            .add_service(
                lattice_proto::externalscaler::external_scaler_server::ExternalScalerServer::new(scaler::Scaler {
                    state: state.clone(),
                }),
            )
            .add_optional_service(state.agents.as_ref().map(|a| {
                AgentCoordinationServer::new(a.orchestrator.clone()).max_decoding_message_size(state.cfg.max_body_bytes)
            }))
            .add_optional_service(state.agents.as_ref().map(|a| ChatServer::new(a.chat.clone())))
            .add_optional_service(state.agents.as_ref().map(|a| {
                lattice_proto::agent::tool_catalog_server::ToolCatalogServer::new(tools_api::Catalog {
                    tools: a.orchestrator.tools().clone(),
                })
            }))
            .serve_with_incoming_shutdown(grpc_incoming, grpc_token.cancelled_owned()),
    );

    let http_token = token.clone();
    let http_server = tokio::spawn(conn::serve_http(
        listeners.http,
        http::router(state.clone()).layer(state.gateway.layer(gateway::Protocol::Http)),
        limits,
        state.tls.http.clone(),
        http_token.cancelled_owned(),
    ));
    let metrics_token = token.clone();
    let metrics_server = tokio::spawn(conn::serve_http(
        listeners.metrics,
        exposition::router(state.clone()),
        limits,
        state.tls.metrics.clone(),
        metrics_token.cancelled_owned(),
    ));

    // Scaling signals exist only while the replica is ready: a warming or draining
    // pod must look missing to the autoscaler, not idle.
    let signals = state.clone();
    let replica = state.repo.metrics().set::<replica_signals::ReplicaSignals>();
    replica.read_from(Box::new(move || {
        signals.is_ready().then(|| {
            let (demand, capacity) = signals.repo.load_signals(None);
            let in_flight = signals.repo.in_flight();
            let model = signals.repo.model_metrics();
            replica_signals::Snapshot {
                load: replica_signals::Load {
                    in_flight,
                    queued: demand.saturating_sub(in_flight),
                    capacity,
                },
                qps: model.qps(),
                queue_p95: model.queue_time_p95(),
                service: model.service_time_mean(),
            }
        })
    }));
    // The predictive policy behind the KEDA external scaler.
    let policy_state = state.clone();
    let policy_cfg = state.cfg.scaling.clone();
    tokio::spawn(async move {
        if let Err(e) = scaling::run(policy_state, policy_cfg).await {
            tracing::error!(error = %e, "scaling policy stopped");
        }
    });
    // One saturation sample per second feeds the scale-in guard.
    let sampler = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = sampler.shutdown.cancelled() => return,
            }
            if sampler.is_ready() {
                let (demand, capacity) = sampler.repo.load_signals(None);
                replica.observe_saturation(demand as f64 / capacity.max(1) as f64);
            }
        }
    });
    if load_models {
        let w = state.cfg.warmup;
        let delay = w.stagger * u32::try_from(w.replica_index).unwrap_or(u32::MAX);
        if !delay.is_zero() {
            tracing::info!(?delay, replica = w.replica_index, "staggered start");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = token.cancelled() => {}
            }
        }
        for e in state.repo.load_all_sharded(w.replica_index, w.replica_count).await {
            tracing::error!(error = %e, "model not loaded at start-up");
        }
    }
    if !token.is_cancelled() {
        state.set_ready(true);
        health.set_ready(true).await;
        tracing::info!("ready");
    }

    tokio::select! {
        () = shutdown => {}
        () = token.cancelled() => {}
    }
    tracing::info!("shutdown signal: readiness off, draining");
    state.set_ready(false);
    health.drain().await;
    if let Some(agents) = &state.agents {
        // Agents learn they must move before their streams end, with the session
        // id as resume token: they resume on another replica (or this one, restarted).
        agents
            .orchestrator
            .drain("server shutting down", Duration::from_millis(100))
            .await;
    }
    token.cancel();
    let drained = tokio::time::timeout(state.cfg.drain_timeout, async {
        let _ = grpc_server.await;
        let _ = http_server.await;
        let _ = metrics_server.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?state.cfg.drain_timeout, "drain timeout reached with requests in flight");
    }
    // Records of the last requests reach the sink before the process exits.
    state.gateway.flush_audit().await;
    Ok(())
}

/// SIGTERM (what Kubernetes sends to start a graceful shutdown) or Ctrl-C.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    // The handlers are installed now, not when the future is first polled (at the
    // end of start-up): a SIGTERM that arrives once the ports serve must drain the
    // server, not kill it with the default action.
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        async fn recv(s: Option<Signal>) {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            tokio::select! {
                () = recv(term) => {}
                () = recv(int) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
