//! `lattice bench`: the flags of [`lattice_bench::serving`].

use std::path::PathBuf;

use clap::Args;

use crate::{cmd::resolve_ort, Failure};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Models to measure (directories of the model repository).
    #[arg(
        long,
        env = "LATTICE_BENCH_MODELS",
        value_delimiter = ',',
        default_value = "magika,minilm,silero_vad"
    )]
    pub models: Vec<String>,
    /// Closed-loop client concurrency levels.
    #[arg(
        long,
        env = "LATTICE_BENCH_CONCURRENCY",
        value_delimiter = ',',
        default_value = "1,8,64"
    )]
    pub concurrency: Vec<usize>,
    /// Servers to load.
    #[arg(
        long,
        env = "LATTICE_BENCH_TARGETS",
        value_enum,
        value_delimiter = ',',
        default_value = "lattice-http,lattice-grpc,gunicorn-2w,uvicorn-2w"
    )]
    pub targets: Vec<lattice_bench::serving::Target>,
    /// Measured seconds per point (after the warm-up).
    #[arg(long, env = "LATTICE_BENCH_DURATION_SECS", default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Unrecorded seconds of load before each measured point.
    #[arg(long, env = "LATTICE_BENCH_WARMUP_SECS", default_value_t = 2.0)]
    pub warmup_secs: f64,
    /// Model repository served by every target.
    #[arg(long, env = "LATTICE_MODEL_REPOSITORY", default_value = "models")]
    pub model_repository: PathBuf,
    /// ONNX Runtime library for the raw-engine baseline and the server.
    #[arg(long, env = "LATTICE_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
    /// HTTP load generator: wrk when installed (lighter, as in the published peer
    /// figures), else the built-in async client; or force one.
    #[arg(long, env = "LATTICE_BENCH_LOAD_GENERATOR", value_enum, default_value_t = lattice_bench::serving::LoadGenerator::Auto)]
    pub load_generator: lattice_bench::serving::LoadGenerator,
    /// Another `lattice` binary served as the `baseline-http` / `baseline-grpc`
    /// targets, on the same repository.
    #[arg(long, env = "LATTICE_BENCH_BASELINE_BIN")]
    pub baseline_bin: Option<PathBuf>,
    /// Where the JSON report is written.
    #[arg(long, env = "LATTICE_BENCH_OUT", default_value = "bench/results")]
    pub out_dir: PathBuf,
}

pub async fn run(args: BenchArgs) -> Result<(), Failure> {
    let ort_library = resolve_ort(args.ort_library)?;
    lattice_bench::serving::run(lattice_bench::serving::Options {
        models: args.models,
        concurrency: args.concurrency,
        targets: args.targets,
        duration_secs: args.duration_secs,
        warmup_secs: args.warmup_secs,
        model_repository: args.model_repository,
        ort_library,
        load_generator: args.load_generator,
        baseline_bin: args.baseline_bin,
        out_dir: args.out_dir,
    })
    .await?;
    Ok(())
}
