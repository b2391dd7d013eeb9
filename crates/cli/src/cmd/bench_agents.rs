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
}

pub async fn run(args: AgentBenchArgs) -> Result<(), Failure> {
    lattice_bench::agents::run(lattice_bench::agents::Options {
        duration_secs: args.duration_secs,
        streams: args.streams,
        window: args.window,
        workers: args.workers,
        out: args.out,
    })
    .await?;
    Ok(())
}
