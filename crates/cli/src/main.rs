//! `lattice`: parses the command line and wires the library crates together.

mod bench;
mod bench_agents;
mod cli;
mod gateway_args;
mod tls_args;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// `EX_USAGE` from sysexits.h: the command was used incorrectly (bad flag or config).
const EX_USAGE: u8 = 64;

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
            Command::Serve(args) => cli::serve(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::BenchAgents(args) => bench_agents::run(args).await,
            Command::Consume(args) => cli::consume(args).await,
            Command::Agent(args) => cli::agent(args).await,
            Command::Chat(args) => cli::chat(args).await,
            Command::Simulate(args) => cli::simulate(args),
            Command::Audit(args) => gateway_args::audit(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(cli::Failure::Usage(reason)) => {
            eprintln!("lattice: {reason}");
            ExitCode::from(EX_USAGE)
        }
        Err(cli::Failure::Runtime(e)) => {
            eprintln!("lattice: {e:#}");
            ExitCode::FAILURE
        }
    }
}
