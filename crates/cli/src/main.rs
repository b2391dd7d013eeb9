//! `lattice`: parses the command line and hands each subcommand to its module under
//! [`cmd`], which wires the library crates together.
//!
//! This file owns the command enum and the failure type every subcommand returns;
//! the subcommands know nothing of each other.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `EX_USAGE` from sysexits.h: the command was used incorrectly (bad flag or config).
const EX_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "lattice",
    version,
    about = "Serve ONNX models over the Open Inference Protocol v2 (REST and gRPC)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the models of a model repository over REST, gRPC and a metrics port.
    Serve(cmd::serve::ServeArgs),
    /// Load-test a running server and the raw engine, and report ratios.
    Bench(cmd::bench::BenchArgs),
    /// Benchmark the agent plane (acks, dedupe, persistence on) against a raw gRPC echo.
    BenchAgents(cmd::bench_agents::AgentBenchArgs),
    /// Pull inference jobs from a NATS JetStream durable consumer and publish results.
    Consume(cmd::consume::ConsumeArgs),
    /// Run a worker agent: hold a stream to an orchestrator and run the tasks it assigns.
    Agent(cmd::agent::AgentArgs),
    /// Chat in a room: send stdin lines, print every message of the room.
    Chat(cmd::chat::ChatArgs),
    /// Replay a load trace through an autoscaling policy and report cost and SLO violations.
    Simulate(cmd::simulate::SimulateArgs),
    /// List audit records (file sink or JetStream), filtered by tenant, time and status.
    Audit(cmd::audit::AuditArgs),
}

/// How a subcommand failed, which decides the exit code.
pub enum Failure {
    /// Bad flags or configuration: exit code 64 with a one-line reason.
    Usage(String),
    /// Anything after start-up: exit code 1 with the error's chain.
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

impl From<lattice_bench::BenchError> for Failure {
    fn from(e: lattice_bench::BenchError) -> Self {
        match e {
            lattice_bench::BenchError::Usage(reason) => Failure::Usage(reason),
            lattice_bench::BenchError::Runtime(e) => Failure::Runtime(e),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("lattice: {}", first.trim_start_matches("error: "));
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lattice: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => cmd::serve::run(args).await,
            Command::Bench(args) => cmd::bench::run(args).await,
            Command::BenchAgents(args) => cmd::bench_agents::run(args).await,
            Command::Consume(args) => cmd::consume::run(args).await,
            Command::Agent(args) => cmd::agent::run(args).await,
            Command::Chat(args) => cmd::chat::run(args).await,
            Command::Simulate(args) => cmd::simulate::run(args),
            Command::Audit(args) => cmd::audit::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(reason)) => {
            eprintln!("lattice: {reason}");
            ExitCode::from(EX_USAGE)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("lattice: {e:#}");
            ExitCode::FAILURE
        }
    }
}
