#!/usr/bin/env bash
# Runs every test: formatting and lint gates, the Rust unit and integration tests
# (real ONNX Runtime, real sockets), and the Python suite that drives a running
# `lattice serve` with the stock tritonclient and grpcio clients.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace

LATTICE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/lattice" .venv/bin/python -m pytest tests/python -q
