"""Fixtures: one real `lattice serve` process for the whole session, plus stock clients.

The server runs against a copy of models/ in a temp dir, so the load/unload tests act
on a repository that nothing else depends on.
"""

import os
import selectors
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
LATTICE_BIN = os.environ.get("LATTICE_BIN", str(ROOT / "target" / "debug" / "lattice"))

STARTUP_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 30


class Server(NamedTuple):
    http_url: str  # "127.0.0.1:PORT", the form tritonclient expects
    grpc_url: str
    metrics_url: str


def _copy_repository(dst: Path) -> None:
    # Only what the server reads: config/tokenizer files and <version>/model.onnx.
    # magika_config.json and MODELS.lock are not part of the served repository.
    for model_dir in sorted(MODELS.iterdir()):
        if not (model_dir / "config.toml").is_file():
            continue
        out = dst / model_dir.name
        out.mkdir(parents=True)
        for f in model_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
            elif f.is_dir() and (f / "model.onnx").is_file():
                (out / f.name).mkdir()
                shutil.copy2(f / "model.onnx", out / f.name / "model.onnx")


def _log_tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def _read_listening_line(proc: subprocess.Popen, log: Path) -> str:
    # readline() alone would block forever on a server that hangs before printing.
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout=STARTUP_TIMEOUT_S):
            raise RuntimeError(f"no 'lattice listening' line within {STARTUP_TIMEOUT_S}s\n{_log_tail(log)}")
        line = proc.stdout.readline().decode().strip()
    finally:
        sel.close()
    if not line.startswith("lattice listening "):
        raise RuntimeError(f"unexpected first stdout line {line!r} (exit {proc.poll()})\n{_log_tail(log)}")
    return line


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("model_repository")
    _copy_repository(repo)
    log = tmp_path_factory.mktemp("server") / "lattice.log"
    cmd = [
        LATTICE_BIN, "serve",
        "--host", "127.0.0.1",
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        "--model-repository", str(repo),
        # The agent plane's embedded store, private to this server.
        "--memory-store", str(tmp_path_factory.mktemp("state") / "agents.redb"),
        # A local test server: authentication and tenant limits off (the suite's
        # clients send no credentials and load-test one tenant); the audit log on,
        # in a private directory.
        "--auth", "off", "--rate-limits", "off",
        "--audit", str(tmp_path_factory.mktemp("audit")),
    ]
    with open(log, "wb") as log_file:
        # cwd=ROOT: the server finds the ONNX Runtime library under ./.venv by itself.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file)
    try:
        line = _read_listening_line(proc, log)
        addrs = dict(part.split("=", 1) for part in line.split()[2:])
        srv = Server(addrs["http"], addrs["grpc"], addrs["metrics"])

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}\n{_log_tail(log)}"
            try:
                if requests.get(f"http://{srv.http_url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready within {STARTUP_TIMEOUT_S}s\n{_log_tail(log)}")
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        raise

    yield srv

    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"server did not exit within {SHUTDOWN_TIMEOUT_S}s of SIGTERM\n{_log_tail(log)}")
    finally:
        proc.stdout.close()
    assert code == 0, f"server exited with {code} after SIGTERM\n{_log_tail(log)}"


@pytest.fixture(scope="session")
def http_client(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def grpc_client(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_url(server):
    return f"http://{server.http_url}"
