//! One module per subcommand: its flags (every flag `--long` + `LATTICE_*` env; the
//! doc comments are the `--help` text) and its `run`.

pub mod agent;
pub mod audit;
pub mod bench;
pub mod bench_agents;
pub mod chat;
pub mod consume;
pub mod serve;
pub mod simulate;

use std::path::PathBuf;

use clap::ValueEnum;

use crate::Failure;

/// A feature flag's value (`--auth on`, `--agents off`), shared by the subcommands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// `--ort-library`, else the library scripts/setup.sh installs under `.venv`.
pub fn resolve_ort(flag: Option<PathBuf>) -> Result<PathBuf, Failure> {
    flag.or_else(|| lattice_inference::backend::onnx::find_library(std::path::Path::new(".")))
        .ok_or_else(|| Failure::Usage("no ONNX Runtime library: run scripts/setup.sh or pass --ort-library".into()))
}
