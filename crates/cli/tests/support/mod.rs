//! Shared by the binary's integration tests: the workspace root and a local
//! `lattice serve` command on ephemeral ports.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// `lattice serve` on 127.0.0.1 with every port 0 and warnings only, as a test
/// runs it; the caller adds what the test is about.
pub fn serve() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lattice"));
    c.current_dir(root()).env_remove("RUST_LOG").args([
        "serve",
        "--host",
        "127.0.0.1",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--log",
        "warn",
    ]);
    c
}
