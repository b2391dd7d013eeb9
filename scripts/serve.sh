#!/usr/bin/env bash
# Runs the service on the embedded default: the bundled models in ./models, REST on
# 8000, gRPC on 8001, metrics on 8002. Extra arguments go to `lattice serve`.
#
# This is the local command, so authentication is off (`--auth off`; the server's
# startup line says so) unless you choose otherwise: set LATTICE_AUTH, or pass
# `--auth on --jwt-keys FILE` / `--api-keys FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
local_auth=(--auth off)
if [[ -n "${LATTICE_AUTH:-}" || " $* " == *" --auth "* || " $* " == *" --auth="* ]]; then
    local_auth=()
fi
exec cargo run --quiet --release -p lattice -- serve "${local_auth[@]}" "$@"
