//! `lattice serve`: flags (every flag `--long` + `LATTICE_*` env), listeners bound,
//! the bound addresses on one stdout line, then `lattice_server::run`.

mod agents;
mod gateway;
mod scaling;
mod tls;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use clap::{Args, ValueEnum};
use lattice_inference::{ModelRepository, RepositoryOptions};
use lattice_observability::{
    telemetry::{self, TelemetryConfig},
    Metrics,
};
use lattice_server::{AppState, Listeners, ServerConfig};
use tokio::net::TcpListener;

use crate::{
    cmd::{resolve_ort, Switch},
    Failure,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address every listener binds to.
    #[arg(long, env = "LATTICE_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// REST port (Triton's default 8000); 0 picks a free port.
    #[arg(long, env = "LATTICE_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,
    /// gRPC port (Triton's default 8001); 0 picks a free port.
    #[arg(long, env = "LATTICE_GRPC_PORT", default_value_t = 8001)]
    pub grpc_port: u16,
    /// Prometheus metrics port (Triton's default 8002); 0 picks a free port.
    #[arg(long, env = "LATTICE_METRICS_PORT", default_value_t = 8002)]
    pub metrics_port: u16,
    /// Model repository: <dir>/<model>/config.toml and <dir>/<model>/<version>/model.onnx.
    #[arg(long, env = "LATTICE_MODEL_REPOSITORY", default_value = "models")]
    pub model_repository: PathBuf,
    /// ONNX Runtime shared library. Defaults to the one scripts/setup.sh installs in .venv.
    #[arg(long, env = "LATTICE_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
    /// Largest request body (REST) or message (gRPC) accepted, in bytes; larger ones get 413.
    #[arg(long, env = "LATTICE_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest answer sent on either protocol, in bytes. A request whose answer would
    /// be larger (many outputs, a large batch of token states) fails with 400 /
    /// RESOURCE_EXHAUSTED before it is encoded. The default holds the bundled models'
    /// largest answer (MiniLM's token states for 32 texts, as JSON) several times over.
    #[arg(long, env = "LATTICE_MAX_RESPONSE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_response_bytes: usize,
    /// Seconds an HTTP/1 client has to send a request's headers; a keep-alive
    /// connection waiting for its next request is closed after this long too.
    #[arg(long, env = "LATTICE_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Seconds a REST request body may take to arrive in all; a slower one fails
    /// (400), so a client trickling bytes cannot hold a connection.
    #[arg(long, env = "LATTICE_BODY_READ_TIMEOUT_SECS", default_value_t = 60)]
    pub body_read_timeout_secs: u64,
    /// Seconds a connection (REST or gRPC) with no request in flight and no traffic
    /// is kept. gRPC keepalive pings come well within it, so live peers stay.
    #[arg(long, env = "LATTICE_IDLE_TIMEOUT_SECS", default_value_t = 120)]
    pub idle_timeout_secs: u64,
    /// Connections open at once on each of the REST and gRPC ports; past it the port
    /// stops accepting until one closes.
    #[arg(long, env = "LATTICE_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Streams one HTTP/2 connection may have open (REST over h2, and gRPC).
    #[arg(long, env = "LATTICE_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = 128)]
    pub http2_max_concurrent_streams: u32,
    /// Seconds a `POST /v1/agents/tasks` session with no task waiting is kept before
    /// it is closed; the table holds 256 (tenant, user) sessions.
    #[arg(long, env = "LATTICE_TASK_SESSION_IDLE_SECS", default_value_t = 60)]
    pub task_session_idle_secs: u64,
    /// Seconds in-flight requests get to finish after SIGTERM before the process exits.
    /// Keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "LATTICE_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Log filter, in tracing's EnvFilter syntax (e.g. "info,lattice_inference=debug").
    #[arg(long, env = "LATTICE_LOG", default_value = "info")]
    pub log: String,
    /// Log line format: human text or JSON (one object per line, with trace_id and span_id).
    #[arg(long, env = "LATTICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// OTLP/gRPC collector that receives spans, e.g. http://127.0.0.1:4317. Off when unset.
    #[arg(long, env = "LATTICE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Share of traces sampled when no route rule matches (0.0 to 1.0). A request that
    /// carries a sampled `traceparent` is always sampled.
    #[arg(long, env = "LATTICE_TRACE_SAMPLE_RATIO", default_value_t = 1.0)]
    pub trace_sample_ratio: f64,
    /// Per-route sampling, comma-separated ROUTE=RATIO; the first route that is a
    /// substring of the span name wins, e.g. "/v2/health=0,/infer=0.1".
    #[arg(long, env = "LATTICE_TRACE_ROUTE_SAMPLE_RATIOS", value_delimiter = ',', value_parser = parse_route_ratio)]
    pub trace_route_sample_ratios: Vec<(String, f64)>,
    /// Request spans and metrics recording. "off" exists to measure their overhead.
    #[arg(long, env = "LATTICE_TELEMETRY", value_enum, default_value_t = Switch::On)]
    pub telemetry: Switch,
    /// Triton's system shared memory extension: a client on this host registers a
    /// POSIX shared-memory object (/dev/shm/<key>) and passes tensors through it.
    /// Registering lets a caller make the server read and write any object in
    /// /dev/shm that the server's user can open, so with --auth on it needs the
    /// admin scope; "off" answers register and unregister with 501 / UNIMPLEMENTED
    /// (Triton's --allow-client-shm=false).
    #[arg(long, env = "LATTICE_SYSTEM_SHARED_MEMORY", value_enum, default_value_t = Switch::On)]
    pub system_shared_memory: Switch,
    /// Shared-memory regions registered at once; past it a registration is 429 /
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "LATTICE_SHM_MAX_REGIONS", default_value_t = 64)]
    pub shm_max_regions: usize,
    /// Total bytes of the registered shared-memory regions. What one request reads
    /// from regions is bounded by --max-body-bytes, as if it came through the socket.
    #[arg(long, env = "LATTICE_SHM_MAX_BYTES", default_value_t = 1 << 30)]
    pub shm_max_bytes: u64,
    /// This replica's position in the fleet (0-based), for sharded warm-up. Defaults
    /// to the StatefulSet ordinal at the end of the hostname, or a hash of it.
    #[arg(long, env = "LATTICE_REPLICA_INDEX")]
    pub replica_index: Option<usize>,
    /// Replicas in the fleet: replica i loads models i, i+N, ... first.
    #[arg(long, env = "LATTICE_REPLICA_COUNT", default_value_t = 1)]
    pub replica_count: usize,
    /// Milliseconds replica i waits (times i) before loading models, so a fleet
    /// started at once does not read the model store and compile all at once.
    #[arg(long, env = "LATTICE_WARMUP_STAGGER_MS", default_value_t = 0)]
    pub warmup_stagger_ms: u64,
    #[command(flatten)]
    pub gateway: gateway::GatewayArgs,
    #[command(flatten)]
    pub tls: tls::TlsArgs,
    #[command(flatten)]
    pub agents: agents::AgentPlaneArgs,
    #[command(flatten)]
    pub pod_cost: scaling::PodCostArgs,
    #[command(flatten)]
    pub scaling: scaling::ScalingArgs,
}

/// A `--trace-route-sample-ratios` entry that is not ROUTE=RATIO with a ratio in
/// 0..=1. clap shows its text after the flag's name.
#[derive(Debug, thiserror::Error)]
enum RouteRatioError {
    #[error("expected ROUTE=RATIO, got '{0}'")]
    Shape(String),
    #[error("'{0}' is not a number")]
    NotANumber(String),
    #[error("ratio {0} is outside 0..=1")]
    OutOfRange(f64),
}

fn parse_route_ratio(s: &str) -> Result<(String, f64), RouteRatioError> {
    let (route, ratio) = s.rsplit_once('=').ok_or_else(|| RouteRatioError::Shape(s.into()))?;
    let ratio: f64 = ratio.parse().map_err(|_| RouteRatioError::NotANumber(ratio.into()))?;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(RouteRatioError::OutOfRange(ratio));
    }
    Ok((route.to_string(), ratio))
}

async fn bind(host: IpAddr, port: u16, what: &str) -> Result<TcpListener, Failure> {
    TcpListener::bind(SocketAddr::new(host, port))
        .await
        .map_err(|e| Failure::Usage(format!("cannot bind {what} port {host}:{port}: {e}")))
}

pub async fn run(args: ServeArgs) -> Result<(), Failure> {
    if !(0.0..=1.0).contains(&args.trace_sample_ratio) {
        return Err(Failure::Usage(format!(
            "--trace-sample-ratio {} is outside 0..=1",
            args.trace_sample_ratio
        )));
    }
    let _telemetry = telemetry::init(&TelemetryConfig {
        filter: args.log.clone(),
        json_logs: matches!(args.log_format, LogFormat::Json),
        otlp_endpoint: args.otlp_endpoint.clone(),
        service_name: "lattice".into(),
        sample_ratio: args.trace_sample_ratio,
        route_sample_ratios: args.trace_route_sample_ratios.clone(),
    })
    .map_err(|e| Failure::Usage(e.to_string()))?;
    let started = std::time::Instant::now();
    let ort_library = resolve_ort(args.ort_library.clone())?;
    let metrics = Arc::new(match args.telemetry {
        Switch::On => Metrics::new(),
        Switch::Off => Metrics::disabled(),
    });
    let repo = ModelRepository::open(
        &RepositoryOptions {
            root: args.model_repository.clone(),
            ort_library,
        },
        metrics,
    )
    .map_err(|e| Failure::Usage(e.to_string()))?;
    let listeners = Listeners {
        http: bind(args.host, args.http_port, "HTTP").await?,
        grpc: bind(args.host, args.grpc_port, "gRPC").await?,
        metrics: bind(
            args.gateway.metrics_host.unwrap_or(args.host),
            args.metrics_port,
            "metrics",
        )
        .await?,
    };
    if args.gateway.auth == Switch::On && args.agents.agent_token.is_some() {
        return Err(Failure::Usage(
            "--agent-token is superseded by --auth on: agents present a JWT or API key with the agent scope".into(),
        ));
    }
    // The server's shutdown token, made here so the gateway's reload tasks stop with it.
    let shutdown = lattice_server::CancellationToken::new();
    let gateway =
        lattice_server::gateway::Gateway::start(&args.gateway.build()?, repo.metrics().clone(), shutdown.clone())
            .await
            .map_err(|e| Failure::Usage(e.to_string()))?;
    let tls = match args.tls.build()? {
        Some(cfg) => {
            lattice_server::tls::Acceptors::start(&cfg, shutdown.clone()).map_err(|e| Failure::Usage(e.to_string()))?
        }
        None => lattice_server::tls::Acceptors::default(),
    };
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    // One machine-readable line: tests and scripts read the bound ports from it. It
    // also says, plainly, whether authentication is off (local use only).
    println!(
        "lattice listening http={} grpc={} metrics={} {} {}",
        addr(&listeners.http),
        addr(&listeners.grpc),
        addr(&listeners.metrics),
        tls.describe(),
        gateway.describe()
    );
    if !gateway.auth_enabled() {
        tracing::warn!("authentication is OFF (--auth off): every caller reaches every API; local use only");
    }
    tracing::info!(elapsed = ?started.elapsed(), "listeners bound");
    for (flag, value) in [
        ("--header-read-timeout-secs", args.header_read_timeout_secs),
        ("--body-read-timeout-secs", args.body_read_timeout_secs),
        ("--idle-timeout-secs", args.idle_timeout_secs),
        ("--task-session-idle-secs", args.task_session_idle_secs),
        (
            "--http2-max-concurrent-streams",
            u64::from(args.http2_max_concurrent_streams),
        ),
        ("--max-connections", args.max_connections as u64),
        ("--max-response-bytes", args.max_response_bytes as u64),
        // To refuse shared memory, --system-shared-memory off says so clearly.
        ("--shm-max-regions", args.shm_max_regions as u64),
        ("--shm-max-bytes", args.shm_max_bytes),
    ] {
        if value == 0 {
            return Err(Failure::Usage(format!("{flag} must be at least 1")));
        }
    }
    let policy = args.scaling.policy()?;
    repo.metrics()
        .set::<lattice_server::replica_signals::ReplicaSignals>()
        .set_guard_config(policy.guard);
    let replica = args.pod_cost.pod_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let scaling = args.scaling.build(policy.predictive, replica)?;
    let agents = args
        .agents
        .build(Some(repo.clone()), repo.metrics().clone(), &args.pod_cost.kube_api)
        .await?;
    let mut state = AppState::new(
        repo,
        ServerConfig {
            max_body_bytes: args.max_body_bytes,
            max_response_bytes: args.max_response_bytes,
            connections: lattice_server::conn::Limits {
                max_connections: args.max_connections,
                header_read_timeout: Duration::from_secs(args.header_read_timeout_secs),
                body_read_timeout: Duration::from_secs(args.body_read_timeout_secs),
                idle_timeout: Duration::from_secs(args.idle_timeout_secs),
                http2_max_concurrent_streams: args.http2_max_concurrent_streams,
            },
            task_session_idle: Duration::from_secs(args.task_session_idle_secs),
            scaling,
            drain_timeout: Duration::from_secs(args.drain_timeout_secs),
            telemetry: args.telemetry == Switch::On,
            warmup: lattice_server::Warmup {
                replica_index: args
                    .replica_index
                    .unwrap_or_else(|| replica_index_from_hostname(args.replica_count)),
                replica_count: args.replica_count.max(1),
                stagger: Duration::from_millis(args.warmup_stagger_ms),
            },
            shm: lattice_server::shm::Limits {
                enabled: args.system_shared_memory == Switch::On,
                max_regions: args.shm_max_regions,
                max_bytes: args.shm_max_bytes,
                ..Default::default()
            },
        },
    );
    if let Some(agents) = agents {
        state = state.with_agents(agents);
    }
    state.shutdown = shutdown;
    state = state.with_gateway(gateway).with_tls(tls);
    if let Some((cfg, http)) = args.pod_cost.build()? {
        tokio::spawn(lattice_server::podcost::run(
            cfg,
            state.repo.metrics().clone(),
            http,
            state.shutdown.clone(),
        ));
    }
    lattice_server::run(state, listeners, true, lattice_server::shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// "lattice-3" -> 3 (a StatefulSet pod); otherwise a stable hash of the hostname.
fn replica_index_from_hostname(count: usize) -> usize {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    if let Some(n) = host.rsplit('-').next().and_then(|s| s.parse::<usize>().ok()) {
        return n;
    }
    // FNV-1a: stable across processes, unlike the std hasher.
    let h = host.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    usize::try_from(h % count.max(1) as u64).unwrap_or(0)
}
