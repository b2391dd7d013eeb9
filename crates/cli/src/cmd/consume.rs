//! `lattice consume`: inference jobs pulled from a JetStream durable consumer.

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use lattice_inference::{ModelRepository, RepositoryOptions};
use lattice_observability::{
    telemetry::{self, TelemetryConfig},
    Metrics,
};

use crate::{cmd::resolve_ort, Failure};

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

pub async fn run(args: ConsumeArgs) -> Result<(), Failure> {
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
