#!/usr/bin/env bash
# Start one Python peer server of `lattice bench` in the foreground.
# Usage: run_peer.sh NAME PORT MODEL
#   NAME   gunicorn-2w (Flask, 2 sync workers) | uvicorn-2w (FastAPI, 2 workers)
#   MODEL  magika | minilm | silero_vad | all
# ORT_THREADS (default 1) sets each ONNX Runtime session's intra-op threads.
# The script execs the server, so its PID is the server's (the master process).
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "usage: $0 NAME PORT MODEL" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
bin="${VENV:-$here/../../.venv}/bin"
name=$1
port=$2
export MODEL=$3
# Checked here because a worker that fails to load is respawned in a loop by both
# gunicorn and uvicorn: the server would never become ready, nor exit.
case "$MODEL" in
  magika | minilm | silero_vad | all) ;;
  *)
    echo "unknown MODEL '$MODEL': expected magika, minilm, silero_vad or all" >&2
    exit 2
    ;;
esac
cd "$here"
case "$name" in
  # gunicorn 27 opens a control socket at a fixed path under $HOME by default;
  # two peers running at once would share it, and the benchmark has no use for it.
  gunicorn-2w) exec "$bin/gunicorn" -w 2 -b "127.0.0.1:$port" --no-control-socket flask_server:app ;;
  uvicorn-2w) exec "$bin/uvicorn" fastapi_server:app --host 127.0.0.1 --port "$port" --workers 2 --no-access-log ;;
  *)
    echo "unknown peer '$name': expected gunicorn-2w or uvicorn-2w" >&2
    exit 2
    ;;
esac
