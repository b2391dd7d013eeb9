//! Command-line flags. Every flag has a long name and an environment variable; the doc
//! comments are the `--help` text.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use lattice_inference::{ModelRepository, RepositoryOptions};
use lattice_observability::{
    telemetry::{self, TelemetryConfig},
    Metrics,
};
use lattice_server::{AppState, Listeners, ServerConfig};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    name = "lattice",
    version,
    about = "Serve ONNX models over the Open Inference Protocol v2 (REST and gRPC)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the models of a model repository over REST, gRPC and a metrics port.
    Serve(ServeArgs),
    /// Load-test a running server and the raw engine, and report ratios.
    Bench(crate::bench::BenchArgs),
    /// Benchmark the agent plane (acks, dedupe, persistence on) against a raw gRPC echo.
    BenchAgents(crate::bench_agents::AgentBenchArgs),
    /// Pull inference jobs from a NATS JetStream durable consumer and publish results.
    Consume(ConsumeArgs),
    /// Run a worker agent: hold a stream to an orchestrator and run the tasks it assigns.
    Agent(AgentArgs),
    /// Chat in a room: send stdin lines, print every message of the room.
    Chat(ChatArgs),
    /// Replay a load trace through an autoscaling policy and report cost and SLO violations.
    Simulate(SimulateArgs),
    /// List audit records (file sink or JetStream), filtered by tenant, time and status.
    Audit(crate::gateway_args::AuditArgs),
}

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// CSV of `second,arrivals` (shipped: crates/sim/traces/{spike,diurnal,onoff}.csv).
    #[arg(long, env = "LATTICE_SIM_TRACE")]
    pub trace: PathBuf,
    /// Autoscaler model(s): hpa, keda, kpa, ray, lattice (comma-separated; several
    /// policies also write a comparison plot).
    #[arg(long, env = "LATTICE_SIM_POLICY", value_delimiter = ',', default_value = "lattice")]
    pub policy: Vec<String>,
    /// Directory for <policy>.csv, <policy>.svg and, with several policies, comparison.svg.
    #[arg(long, env = "LATTICE_SIM_OUT", default_value = "sim-out")]
    pub out: PathBuf,
    /// Time a request holds a slot, in milliseconds.
    #[arg(long, env = "LATTICE_SIM_SERVICE_TIME_MS", default_value_t = 100.0)]
    pub service_time_ms: f64,
    /// Requests one pod serves at once.
    #[arg(long, env = "LATTICE_SIM_CONCURRENCY", default_value_t = 4)]
    pub concurrency: u32,
    /// Seconds from pod creation to a running container.
    #[arg(long, env = "LATTICE_SIM_POD_START_S", default_value_t = 20)]
    pub pod_start_s: u64,
    /// Seconds of model load and warm-up before the pod is ready.
    #[arg(long, env = "LATTICE_SIM_WARMUP_S", default_value_t = 40)]
    pub warmup_s: u64,
    /// Latency objective, in milliseconds; slower or rejected requests violate it.
    #[arg(long, env = "LATTICE_SIM_SLO_MS", default_value_t = 500.0)]
    pub slo_ms: f64,
    #[arg(long, env = "LATTICE_SIM_MIN_REPLICAS", default_value_t = 1)]
    pub min_replicas: u32,
    #[arg(long, env = "LATTICE_SIM_MAX_REPLICAS", default_value_t = 50)]
    pub max_replicas: u32,
}

pub fn simulate(args: SimulateArgs) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let trace = lattice_sim::Trace::load(&args.trace).map_err(|e| Failure::Usage(format!("--trace: {e}")))?;
    let policies = args
        .policy
        .iter()
        .map(|p| lattice_sim::parse_policy(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let cfg = lattice_sim::SimConfig {
        service_time_ms: args.service_time_ms,
        concurrency: args.concurrency,
        pod_start_s: args.pod_start_s,
        warmup_s: args.warmup_s,
        slo_ms: args.slo_ms,
        min_replicas: args.min_replicas,
        max_replicas: args.max_replicas,
        ..lattice_sim::SimConfig::default()
    };
    cfg.validate().map_err(|e| Failure::Usage(e.to_string()))?;
    std::fs::create_dir_all(&args.out).map_err(|e| Failure::Usage(format!("--out {}: {e}", args.out.display())))?;
    let mut reports = Vec::new();
    for policy in policies {
        eprintln!("simulating {policy} on {}", args.trace.display());
        let report = if std::io::stderr().is_terminal() {
            let mut bar = lattice_sim::ProgressBar::new(std::io::stderr(), 40);
            let mut draw = |done, total| bar.update(done, total);
            let r = lattice_sim::run(&trace, policy, &cfg, Some(&mut draw));
            bar.finish();
            r
        } else {
            lattice_sim::run(&trace, policy, &cfg, None)
        };
        println!("{}", report.summary);
        report
            .write_csv(&args.out.join(format!("{policy}.csv")))
            .and_then(|()| lattice_sim::plot::write_single(&report, &args.out.join(format!("{policy}.svg"))))
            .map_err(|e| Failure::Runtime(anyhow::anyhow!("writing to {}: {e}", args.out.display())))?;
        reports.push(report);
    }
    if reports.len() > 1 {
        let title = format!("{}", args.trace.display());
        lattice_sim::plot::write_comparison(&title, &reports, &args.out.join("comparison.svg"))
            .and_then(|()| lattice_sim::report::write_summary_csv(&reports, &args.out.join("summary.csv")))
            .map_err(|e| Failure::Runtime(anyhow::anyhow!("writing to {}: {e}", args.out.display())))?;
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Orchestrator gRPC URL(s), tried in turn on reconnect (comma-separated).
    #[arg(
        long,
        env = "LATTICE_ORCHESTRATOR",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8001"
    )]
    pub orchestrator: Vec<String>,
    /// Capabilities this worker serves (tasks are routed by capability).
    #[arg(long, env = "LATTICE_CAPABILITY", value_delimiter = ',', required = true)]
    pub capability: Vec<String>,
    /// Tasks run at once.
    #[arg(long, env = "LATTICE_MAX_IN_FLIGHT", default_value_t = 16)]
    pub max_in_flight: u32,
    /// Name in logs and frames; defaults to agent-<pid>.
    #[arg(long, env = "LATTICE_AGENT_ID")]
    pub agent_id: Option<String>,
    /// Tenant the agent acts for.
    #[arg(long, env = "LATTICE_TENANT", default_value = "default")]
    pub tenant: String,
    /// Credential the server requires: a JWT or API key with the agent scope (or
    /// the legacy --agent-token).
    #[arg(long, env = "LATTICE_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Log filter, in tracing's EnvFilter syntax. Text logs carry events only, so
    /// directives scoped to a span (`[grpc.request]=debug`) take effect with
    /// `--log-format json`.
    #[arg(long, env = "LATTICE_LOG", default_value = "info")]
    pub log: String,
    #[command(flatten)]
    pub tls: crate::tls_args::ClientTlsArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    /// Server gRPC URL.
    #[arg(long, env = "LATTICE_CHAT_SERVER", default_value = "http://127.0.0.1:8001")]
    pub server: String,
    /// Room to join.
    #[arg(long, env = "LATTICE_CHAT_ROOM", default_value = "lobby")]
    pub room: String,
    /// Name shown with your messages.
    #[arg(long, env = "LATTICE_CHAT_NAME", default_value = "anonymous")]
    pub name: String,
}

#[derive(Args, Debug, Clone)]
pub struct ConsumeArgs {
    /// NATS server with JetStream.
    #[arg(long, env = "LATTICE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Stream holding the jobs (created if missing).
    #[arg(long, env = "LATTICE_JOBS_STREAM", default_value = "LATTICE_JOBS")]
    pub jobs_stream: String,
    /// Jobs are published on <SUBJECT>.<model> with a Nats-Msg-Id header as the job id.
    #[arg(long, env = "LATTICE_JOBS_SUBJECT", default_value = "lattice.jobs")]
    pub jobs_subject: String,
    /// Stream holding the results (created if missing).
    #[arg(long, env = "LATTICE_RESULTS_STREAM", default_value = "LATTICE_RESULTS")]
    pub results_stream: String,
    /// Results are published on <SUBJECT>.<job id>.
    #[arg(long, env = "LATTICE_RESULTS_SUBJECT", default_value = "lattice.results")]
    pub results_subject: String,
    /// Durable consumer name shared by every replica (they split the work).
    #[arg(long, env = "LATTICE_DURABLE", default_value = "lattice-workers")]
    pub durable: String,
    /// Jobs in progress at once per replica.
    #[arg(long, env = "LATTICE_CONSUME_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds the results stream remembers job ids, so a redelivered job's result is stored once.
    #[arg(long, env = "LATTICE_DEDUPE_WINDOW_SECS", default_value_t = 600)]
    pub dedupe_window_secs: u64,
    /// Seconds a delivered job may stay unacked (e.g. its replica crashed) before it is
    /// redelivered. Longer than the slowest job.
    #[arg(long, env = "LATTICE_ACK_WAIT_SECS", default_value_t = 30)]
    pub ack_wait_secs: u64,
    /// Milliseconds before a job that failed for a transient reason is redelivered.
    #[arg(long, env = "LATTICE_RETRY_DELAY_MS", default_value_t = 500)]
    pub retry_delay_ms: u64,
    /// Model repository.
    #[arg(long, env = "LATTICE_MODEL_REPOSITORY", default_value = "models")]
    pub model_repository: PathBuf,
    /// ONNX Runtime shared library. Defaults to the one scripts/setup.sh installs in .venv.
    #[arg(long, env = "LATTICE_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
    /// Log filter, in tracing's EnvFilter syntax. Text logs carry events only, so
    /// directives scoped to a span (`[grpc.request]=debug`) take effect with
    /// `--log-format json`.
    #[arg(long, env = "LATTICE_LOG", default_value = "info")]
    pub log: String,
}

pub async fn consume(args: ConsumeArgs) -> Result<(), Failure> {
    if args.concurrency == 0 {
        return Err(Failure::Usage("--concurrency must be at least 1".into()));
    }
    let _telemetry = telemetry::init(&TelemetryConfig {
        filter: args.log.clone(),
        json_logs: false,
        otlp_endpoint: None,
        service_name: "lattice-consume".into(),
        sample_ratio: 1.0,
        route_sample_ratios: Vec::new(),
    })
    .map_err(|e| Failure::Usage(e.to_string()))?;
    let repo = ModelRepository::open(
        &RepositoryOptions {
            root: args.model_repository.clone(),
            ort_library: resolve_ort(args.ort_library.clone())?,
        },
        Arc::new(Metrics::new()),
    )
    .map_err(|e| Failure::Usage(e.to_string()))?;
    for e in repo.load_all().await {
        tracing::error!(error = %e, "model not loaded");
    }
    let cfg = lattice_server::jetstream::ConsumerConfig {
        nats_url: args.nats_url,
        jobs_stream: args.jobs_stream,
        jobs_subject: args.jobs_subject,
        results_stream: args.results_stream,
        results_subject: args.results_subject,
        durable: args.durable,
        concurrency: args.concurrency,
        dedupe_window: Duration::from_secs(args.dedupe_window_secs),
        retry_delay: Duration::from_millis(args.retry_delay_ms),
        ack_wait: Duration::from_secs(args.ack_wait_secs.max(1)),
    };
    // One line for scripts and tests: models are loaded, pulling starts now.
    println!("lattice consuming stream={} durable={}", cfg.jobs_stream, cfg.durable);
    lattice_server::jetstream::run(cfg, repo, lattice_server::shutdown_signal()).await?;
    Ok(())
}

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
    pub gateway: crate::gateway_args::GatewayArgs,
    #[command(flatten)]
    pub tls: crate::tls_args::TlsArgs,
    #[command(flatten)]
    pub agents: AgentPlaneArgs,
    #[command(flatten)]
    pub pod_cost: PodCostArgs,
    #[command(flatten)]
    pub scaling: ScalingArgs,
}

/// The predictive scaling policy the KEDA external scaler serves (the one
/// `lattice simulate --policy lattice` runs).
#[derive(Args, Debug, Clone)]
pub struct ScalingArgs {
    /// Where replicas share their per-second arrivals and queue depth, so every
    /// replica's scaler answers for the whole fleet: redis://HOST:PORT. Unset, the
    /// fleet is this replica alone.
    #[arg(long, env = "LATTICE_SCALING_STORE")]
    pub scaling_store: Option<String>,
    /// Key prefix in the scaling store.
    #[arg(long, env = "LATTICE_SCALING_PREFIX", default_value = "lattice")]
    pub scaling_prefix: String,
    /// Requests per second one replica completes; measured (instances over the mean
    /// compute time per item) when unset.
    #[arg(long, env = "LATTICE_SCALING_POD_CAPACITY")]
    pub scaling_pod_capacity: Option<f64>,
    /// Utilisation a replica is sized for.
    #[arg(long, env = "LATTICE_SCALING_TARGET_UTILIZATION", default_value_t = 0.7)]
    pub scaling_target_utilization: f64,
    /// Seconds from a scale-up decision to a replica that serves (start + warm-up):
    /// how far ahead the policy forecasts.
    #[arg(long, env = "LATTICE_SCALING_LEAD_TIME_SECS", default_value_t = 60)]
    pub scaling_lead_time_secs: u64,
    #[arg(long, env = "LATTICE_SCALING_MIN_REPLICAS", default_value_t = 1)]
    pub scaling_min_replicas: u32,
    #[arg(long, env = "LATTICE_SCALING_MAX_REPLICAS", default_value_t = 50)]
    pub scaling_max_replicas: u32,
    /// TOML file with the policy's constants: `[predictive]` (fast_tau_s, slow_tau_s,
    /// max_projected_growth, drain_horizon_s, deep_surplus, deep_window_s,
    /// shallow_window_s) and `[guard]` (low_load, window_s, hold_s). Defaults as
    /// documented in crates/scaling.
    #[arg(long, env = "LATTICE_SCALING_CONFIG")]
    pub scaling_config: Option<PathBuf>,
}

impl ScalingArgs {
    pub fn policy(&self) -> Result<lattice_scaling::PolicyConfig, Failure> {
        let Some(path) = &self.scaling_config else {
            return Ok(lattice_scaling::PolicyConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("--scaling-config {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Failure::Usage(format!("--scaling-config {}: {e}", path.display())))
    }

    pub fn build(
        &self,
        policy: lattice_scaling::PredictiveConfig,
        replica: String,
    ) -> Result<lattice_server::scaling::ScalingConfig, Failure> {
        if self.scaling_min_replicas > self.scaling_max_replicas {
            return Err(Failure::Usage(
                "--scaling-min-replicas is above --scaling-max-replicas".into(),
            ));
        }
        if !(self.scaling_target_utilization > 0.0 && self.scaling_target_utilization <= 1.0) {
            return Err(Failure::Usage("--scaling-target-utilization must be in (0, 1]".into()));
        }
        Ok(lattice_server::scaling::ScalingConfig {
            policy,
            pod_capacity: self.scaling_pod_capacity.filter(|c| c.is_finite() && *c > 0.0),
            target_utilization: self.scaling_target_utilization,
            lead_time_s: self.scaling_lead_time_secs,
            min_replicas: self.scaling_min_replicas,
            max_replicas: self.scaling_max_replicas,
            store: self.scaling_store.clone(),
            prefix: self.scaling_prefix.clone(),
            replica,
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct PodCostArgs {
    /// Keep this pod's controller.kubernetes.io/pod-deletion-cost annotation equal to
    /// the scale-in guard (idle replicas are removed first on scale-in). Needs RBAC
    /// `patch` on pods (deploy/k8s/base/rbac.yaml).
    #[arg(long, env = "LATTICE_POD_DELETION_COST", value_enum, default_value_t = Switch::Off)]
    pub pod_deletion_cost: Switch,
    /// Kubernetes API, reached through a `kubectl proxy` sidecar that holds the
    /// service-account credentials and the cluster CA (deploy/k8s/base/deployment.yaml).
    #[arg(long, env = "LATTICE_KUBE_API", default_value = "http://127.0.0.1:8011")]
    pub kube_api: String,
    /// This pod's name (the Downward API's metadata.name).
    #[arg(long, env = "LATTICE_POD_NAME")]
    pub pod_name: Option<String>,
    /// This pod's namespace (the Downward API's metadata.namespace).
    #[arg(long, env = "LATTICE_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// Bearer token file sent with each patch, for an API endpoint that wants one
    /// (the proxy sidecar does not).
    #[arg(long, env = "LATTICE_KUBE_TOKEN_FILE")]
    pub kube_token_file: Option<PathBuf>,
    /// Seconds between checks of the cost (a patch is sent only when it changed).
    #[arg(long, env = "LATTICE_POD_DELETION_COST_INTERVAL_SECS", default_value_t = 15)]
    pub pod_deletion_cost_interval_secs: u64,
}

impl PodCostArgs {
    pub fn build(&self) -> Result<Option<(lattice_server::podcost::PodCostConfig, reqwest::Client)>, Failure> {
        if self.pod_deletion_cost == Switch::Off {
            return Ok(None);
        }
        let (Some(pod), Some(namespace)) = (self.pod_name.clone(), self.pod_namespace.clone()) else {
            return Err(Failure::Usage(
                "--pod-deletion-cost on needs --pod-name and --pod-namespace (the Downward API)".into(),
            ));
        };
        if !self.kube_api.starts_with("http://") {
            return Err(Failure::Usage(
                "--kube-api must be http:// (a kubectl proxy sidecar terminates TLS to the API server)".into(),
            ));
        }
        let token = match &self.kube_token_file {
            Some(f) => std::fs::read_to_string(f)
                .map_err(|e| Failure::Usage(format!("--kube-token-file {}: {e}", f.display())))?
                .trim()
                .to_string(),
            None => String::new(),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Failure::Usage(format!("kubernetes client: {e}")))?;
        Ok(Some((
            lattice_server::podcost::PodCostConfig {
                api: self.kube_api.clone(),
                namespace,
                pod,
                token,
                interval: Duration::from_secs(self.pod_deletion_cost_interval_secs.max(1)),
            },
            http,
        )))
    }
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

#[derive(Args, Debug, Clone)]
pub struct AgentPlaneArgs {
    /// The agent plane (orchestrator, memory broker, tool gateway, chat) on the gRPC port.
    #[arg(long, env = "LATTICE_AGENTS", value_enum, default_value_t = Switch::On)]
    pub agents: Switch,
    /// Where sessions, outboxes, tasks, memory and the tool cache persist: a file
    /// path (embedded redb, one replica) or redis://HOST:PORT (shared by replicas).
    #[arg(long, env = "LATTICE_MEMORY_STORE", default_value = "lattice-state/agents.redb")]
    pub memory_store: lattice_agent::store::StoreUrl,
    /// Key prefix in a shared Redis, so several deployments can use one server.
    #[arg(long, env = "LATTICE_STORE_PREFIX", default_value = "lattice")]
    pub store_prefix: String,
    /// Heartbeat interval of agent streams, in milliseconds; three missed ones end a stream.
    #[arg(long, env = "LATTICE_HEARTBEAT_MS", default_value_t = 5000)]
    pub heartbeat_ms: u64,
    /// Seconds a disconnected session is kept for its agent to resume.
    #[arg(long, env = "LATTICE_SESSION_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    pub session_idle_timeout_secs: u64,
    /// Milliseconds after which the tasks of a disconnected worker go to another worker.
    #[arg(long, env = "LATTICE_REASSIGN_AFTER_MS", default_value_t = 10_000)]
    pub reassign_after_ms: u64,
    /// Attempts before a task is dead-lettered.
    #[arg(long, env = "LATTICE_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Tasks queued across all priorities before offers are refused.
    #[arg(long, env = "LATTICE_MAX_QUEUED_TASKS", default_value_t = 100_000)]
    pub max_queued_tasks: usize,
    /// Tasks one requester may have outstanding before its stream is no longer read.
    #[arg(long, env = "LATTICE_REQUESTER_WINDOW", default_value_t = 1024)]
    pub requester_window: u32,
    /// Bearer token agent streams must carry; none when unset.
    #[arg(long, env = "LATTICE_AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,
    /// Origins the `http_fetch` tool may reach, comma-separated (e.g.
    /// "https://api.example.com,http://10.0.0.5:8080"). Empty, the default, means
    /// none: a tool runs with the server's network position, which includes
    /// loopback and the pod's sidecars.
    #[arg(long, env = "LATTICE_TOOL_FETCH_ALLOW", value_delimiter = ',')]
    pub tool_fetch_allow: Vec<String>,
    /// A TOML file listing MCP tool servers (stdio commands or Streamable HTTP
    /// URLs, per tenant or global) whose tools join the tool gateway as
    /// `<server>.<tool>`; re-read every second while the server runs.
    #[arg(long, env = "LATTICE_MCP_CONFIG")]
    pub mcp_config: Option<PathBuf>,
}

impl AgentPlaneArgs {
    /// `kube_api`: the credentialed Kubernetes API proxy, which no tool may reach.
    pub async fn build(
        &self,
        repo: Option<ModelRepository>,
        metrics: Arc<Metrics>,
        kube_api: &str,
    ) -> Result<Option<lattice_server::AgentPlane>, Failure> {
        use lattice_agent::{
            orchestrator::{Orchestrator, OrchestratorConfig},
            store::{Store, StoreUrl},
            tools::ToolGateway,
        };
        if self.agents == Switch::Off {
            return Ok(None);
        }
        if self.heartbeat_ms == 0 || self.requester_window == 0 || self.max_attempts == 0 {
            return Err(Failure::Usage(
                "--heartbeat-ms, --requester-window and --max-attempts must be at least 1".into(),
            ));
        }
        let store = Store::open(&self.memory_store, &self.store_prefix)
            .await
            .map_err(|e| Failure::Usage(format!("--memory-store: {e:#}")))?;
        let tools = ToolGateway::new(store.clone(), repo, metrics.clone())?;
        tools.set_fetch_allow(fetch_allow(&self.tool_fetch_allow, kube_api)?);
        if let Some(path) = &self.mcp_config {
            let kube = kube_api.to_string();
            // An MCP URL follows --tool-fetch-allow's rule: any http(s) origin the
            // operator lists, except the credentialed Kubernetes API proxy.
            let parse = move |bytes: &[u8]| {
                lattice_agent::mcp::McpConfig::parse(bytes, &|u| {
                    fetch_allow(&[u.to_string()], &kube).map(|_| ()).map_err(|e| match e {
                        Failure::Usage(m) => m,
                        Failure::Runtime(e) => e.to_string(),
                    })
                })
            };
            let bytes =
                std::fs::read(path).map_err(|e| Failure::Usage(format!("--mcp-config {}: {e}", path.display())))?;
            let cfg = parse(&bytes).map_err(|e| Failure::Usage(format!("--mcp-config {}: {e}", path.display())))?;
            tools.mcp().apply(cfg);
            tools.mcp().watch(path.clone(), parse);
        }
        let cfg = OrchestratorConfig {
            heartbeat_interval: Duration::from_millis(self.heartbeat_ms),
            session_idle_timeout: Duration::from_secs(self.session_idle_timeout_secs),
            reassign_after: Duration::from_millis(self.reassign_after_ms),
            max_attempts: self.max_attempts,
            max_queued: self.max_queued_tasks,
            requester_window: self.requester_window,
            // One replica owns an embedded store; replicas sharing Redis adopt
            // sessions as their agents resume.
            adopt_all_on_start: matches!(self.memory_store, StoreUrl::Redb(_)),
            auth_token: self.agent_token.clone(),
            ..OrchestratorConfig::default()
        };
        let orchestrator = Orchestrator::new(cfg, store, tools, metrics).await?;
        Ok(Some(lattice_server::AgentPlane {
            orchestrator,
            chat: lattice_agent::chat::ChatService::default(),
            token: self.agent_token.clone(),
        }))
    }
}

/// Parses `--tool-fetch-allow`; the Kubernetes API proxy is refused even if listed,
/// under any name for loopback.
fn fetch_allow(entries: &[String], kube_api: &str) -> Result<Vec<reqwest::Url>, Failure> {
    let kube = reqwest::Url::parse(kube_api).ok();
    let is_loopback = |u: &reqwest::Url| match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    let is_kube = |u: &reqwest::Url| {
        kube.as_ref().is_some_and(|k| {
            u.origin() == k.origin()
                || (is_loopback(u) && is_loopback(k) && u.port_or_known_default() == k.port_or_known_default())
        })
    };
    entries
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let url = reqwest::Url::parse(e.trim())
                .map_err(|err| Failure::Usage(format!("--tool-fetch-allow: '{e}': {err}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(Failure::Usage(format!(
                    "--tool-fetch-allow: '{e}' must be an http(s) origin such as https://host:port"
                )));
            }
            if is_kube(&url) {
                return Err(Failure::Usage(format!(
                    "--tool-fetch-allow: '{e}' is the Kubernetes API proxy (--kube-api), which no tool may reach"
                )));
            }
            Ok(url)
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

fn parse_route_ratio(s: &str) -> Result<(String, f64), String> {
    let (route, ratio) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("expected ROUTE=RATIO, got '{s}'"))?;
    let ratio: f64 = ratio.parse().map_err(|_| format!("'{ratio}' is not a number"))?;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(format!("ratio {ratio} is outside 0..=1"));
    }
    Ok((route.to_string(), ratio))
}

pub enum Failure {
    /// Bad flags or configuration: exit code 64 with a one-line reason.
    Usage(String),
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

impl From<lattice_agent::store::StoreError> for Failure {
    fn from(e: lattice_agent::store::StoreError) -> Self {
        Failure::Runtime(e.into())
    }
}

pub fn resolve_ort(flag: Option<PathBuf>) -> Result<PathBuf, Failure> {
    flag.or_else(|| lattice_inference::backend::onnx::find_library(std::path::Path::new(".")))
        .ok_or_else(|| Failure::Usage("no ONNX Runtime library: run scripts/setup.sh or pass --ort-library".into()))
}

async fn bind(host: IpAddr, port: u16, what: &str) -> Result<TcpListener, Failure> {
    TcpListener::bind(SocketAddr::new(host, port))
        .await
        .map_err(|e| Failure::Usage(format!("cannot bind {what} port {host}:{port}: {e}")))
}

pub async fn serve(args: ServeArgs) -> Result<(), Failure> {
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
            .map_err(Failure::Usage)?;
    let tls = match args.tls.build()? {
        Some(cfg) => lattice_server::tls::Acceptors::start(&cfg, shutdown.clone()).map_err(Failure::Usage)?,
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

pub async fn agent(args: AgentArgs) -> Result<(), Failure> {
    let _telemetry = telemetry::init(&TelemetryConfig {
        filter: args.log.clone(),
        json_logs: false,
        otlp_endpoint: None,
        service_name: "lattice-agent".into(),
        sample_ratio: 1.0,
        route_sample_ratios: Vec::new(),
    })
    .map_err(|e| Failure::Usage(e.to_string()))?;
    if args.max_in_flight == 0 {
        return Err(Failure::Usage("--max-in-flight must be at least 1".into()));
    }
    let client = lattice_agent::client::ClientConfig {
        endpoints: args.orchestrator.clone(),
        tls: args.tls.build(&args.orchestrator)?,
        agent_id: args
            .agent_id
            .clone()
            .unwrap_or_else(|| format!("agent-{}", std::process::id())),
        tenant: args.tenant.clone(),
        capabilities: args.capability.clone(),
        max_in_flight: args.max_in_flight,
        auth_token: args.token.clone(),
        // The gateway checks the tenant a stream names against its credential.
        metadata: vec![("x-tenant-id".into(), args.tenant.clone())],
        ..lattice_agent::client::ClientConfig::default()
    };
    println!(
        "lattice agent capabilities={} orchestrator={}",
        args.capability.join(","),
        args.orchestrator.join(",")
    );
    lattice_agent::worker::run(
        lattice_agent::worker::WorkerConfig { client },
        lattice_server::shutdown_signal(),
    )
    .await?;
    Ok(())
}

pub async fn chat(args: ChatArgs) -> Result<(), Failure> {
    use lattice_proto::agent::{chat_client::ChatClient, ChatMessage};
    use tokio::io::AsyncBufReadExt;
    let mut client = ChatClient::connect(args.server.clone())
        .await
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("cannot reach {}: {e}", args.server)))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<ChatMessage>(64);
    let (room, name) = (args.room.clone(), args.name.clone());
    // Stdin is read on its own task: the reply stream keeps printing while the
    // user types. EOF (or Ctrl-D) half-closes the sending side.
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let msg = ChatMessage {
                room: room.clone(),
                sender: name.clone(),
                text: line,
                ..ChatMessage::default()
            };
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut replies = client
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| Failure::Runtime(anyhow::anyhow!("chat refused: {}", s.message())))?
        .into_inner();
    loop {
        match replies.message().await {
            Ok(Some(m)) => println!("[{}#{}] {}: {}", m.room, m.seq, m.sender, m.text),
            Ok(None) => return Ok(()),
            Err(s) => return Err(Failure::Runtime(anyhow::anyhow!("chat ended: {}", s.message()))),
        }
    }
}
