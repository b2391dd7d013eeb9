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

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the models of a model repository over REST, gRPC and a metrics port.
    Serve(ServeArgs),
    /// Load-test a running server and the raw engine, and report ratios.
    Bench(crate::bench::BenchArgs),
    /// Pull inference jobs from a NATS JetStream durable consumer and publish results.
    Consume(ConsumeArgs),
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
    /// Log filter, in tracing's EnvFilter syntax.
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
    .map_err(Failure::Usage)?;
    let repo = ModelRepository::open(
        &RepositoryOptions {
            root: args.model_repository.clone(),
            ort_library: resolve_ort(args.ort_library.clone())?,
        },
        Arc::new(Metrics::new()),
    )
    .map_err(Failure::Usage)?;
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
    .map_err(Failure::Usage)?;
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
    .map_err(Failure::Usage)?;
    let listeners = Listeners {
        http: bind(args.host, args.http_port, "HTTP").await?,
        grpc: bind(args.host, args.grpc_port, "gRPC").await?,
        metrics: bind(args.host, args.metrics_port, "metrics").await?,
    };
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    // One machine-readable line: tests and scripts read the bound ports from it.
    println!(
        "lattice listening http={} grpc={} metrics={}",
        addr(&listeners.http),
        addr(&listeners.grpc),
        addr(&listeners.metrics)
    );
    tracing::info!(elapsed = ?started.elapsed(), "listeners bound");
    let state = AppState::new(
        repo,
        ServerConfig {
            max_body_bytes: args.max_body_bytes,
            drain_timeout: Duration::from_secs(args.drain_timeout_secs),
            telemetry: args.telemetry == Switch::On,
        },
    );
    lattice_server::run(state, listeners, true, lattice_server::shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}
