#!/usr/bin/env bash
# Runs the service on the embedded default: the bundled models in ./models, REST on
# 8000, gRPC on 8001, metrics on 8002. Extra arguments go to `lattice serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --quiet --release -p lattice -- serve "$@"
