#!/usr/bin/env bash
# What telemetry costs per request, counted in instructions: `lattice serve` runs
# under valgrind's callgrind, which counts the instructions every thread of the
# server executes, whatever else the machine is doing. After a warm-up, the counters
# are zeroed, N identical requests are sent one at a time, and the count is read.
# Each configuration is compared with `--telemetry off` in the same run:
#
#   default     metrics on, spans only where they go somewhere (none here)
#   export-1%   OTLP export, 1% of traces sampled (spans built for every request)
#   export-all  OTLP export of every span, to a receiver that accepts all
#
# Instructions are not time (cache misses, lock waits and the kernel are not in
# them), but they are repeatable to a few parts in ten thousand, where throughput on
# a shared two-core machine moves by several percent from one round to the next;
# `lattice bench` gives the throughput side.
#
# Usage: bench/telemetry-cost/run.sh [requests]   (default 200; needs valgrind)
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-200}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
scripts/setup.sh >/dev/null
cargo build --release --quiet -p lattice
ort=$(ls "$PWD"/.venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1* | head -n1)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# The compute-light model alone: its ~0.1 ms requests show the server's own costs.
mkdir -p "$work/repo"
ln -s "$PWD/models/silero_vad" "$work/repo/silero_vad"
.venv/bin/python - "$work/body.json" <<'PY'
import json, math, sys
audio = [math.sin(i * 0.1728) * 0.3 for i in range(576)]
json.dump({"inputs": [
    {"name": "input", "shape": [1, 576], "datatype": "FP32", "data": audio},
    {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": [0.0] * 256},
    {"name": "sr", "shape": [], "datatype": "INT64", "data": [16000]}],
  "outputs": [{"name": "output"}, {"name": "stateN"}]}, open(sys.argv[1], "w"))
PY

.venv/bin/python bench/telemetry-cost/otlp_sink.py > "$work/sink.out" &
until grep -q otlp-sink "$work/sink.out" 2>/dev/null; do sleep 0.1; done
sink="http://$(cut -d' ' -f2 "$work/sink.out")"

send() { # url count
  for _ in $(seq "$2"); do
    curl -sf -o /dev/null -X POST -H 'content-type: application/json' --data @"$work/body.json" "$1" ||
      { echo "request failed" >&2; exit 1; }
  done
}

# Prints the instructions the server executed for $n requests.
count() { # name, serve flags...
  local name=$1; shift
  LATTICE_ORT_LIBRARY=$ort valgrind --tool=callgrind --callgrind-out-file="$work/$name.%p" \
    target/release/lattice serve --model-repository "$work/repo" --host 127.0.0.1 \
    --http-port 0 --grpc-port 0 --metrics-port 0 --agents off "$@" \
    > "$work/$name.out" 2> "$work/$name.err" &
  local pid=$!
  until grep -q listening "$work/$name.out" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { cat "$work/$name.err" >&2; exit 1; }
    sleep 0.2
  done
  local http; http=$(grep -o 'http=[^ ]*' "$work/$name.out" | cut -d= -f2)
  until curl -sf "http://$http/v2/health/ready"; do sleep 0.2; done
  local url="http://$http/v2/models/silero_vad/infer"
  send "$url" 50
  callgrind_control -z $pid > /dev/null 2>&1
  send "$url" "$n"
  callgrind_control -d $pid > /dev/null 2>&1
  kill $pid; wait $pid 2>/dev/null || true
  grep -l "Trigger: dump" "$work/$name".* | xargs grep -h '^totals:' | awk '{print $2}'
}

echo "counting instructions of $n requests per configuration (silero_vad over REST, JSON)"
off=$(count off --telemetry off)
printf '| configuration | instructions / request | off / configuration |\n|---|---|---|\n'
printf '| telemetry off | %d | 1.0000 |\n' $((off / n))
for cfg in default export-1% export-all; do
  case $cfg in
    default) ir=$(count default) ;;
    export-1%) ir=$(count export1 --otlp-endpoint "$sink" --trace-sample-ratio 0.01) ;;
    export-all) ir=$(count exportall --otlp-endpoint "$sink" --trace-sample-ratio 1) ;;
  esac
  printf '| %s | %d | %s |\n' "$cfg" $((ir / n)) "$(awk -v a="$off" -v b="$ir" 'BEGIN {printf "%.4f", a / b}')"
done
