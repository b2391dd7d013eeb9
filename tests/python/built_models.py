"""Small ONNX models built with the `onnx` package, to Triton's contracts, and a
server of one's own on a repository of them (conftest's pattern), for tests that need
models the bundled repository does not have."""

import os
import selectors
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import onnx
import requests
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]
LATTICE_BIN = os.environ.get("LATTICE_BIN", str(ROOT / "target" / "debug" / "lattice"))
STARTUP_TIMEOUT_S = 30
# An opset and IR version the bundled ONNX Runtime reads.
OPSET = [helper.make_opsetid("", 13)]
IR_VERSION = 8

# Triton's `simple` contract: INPUT0 + INPUT1 and INPUT0 - INPUT1 on INT32 [-1, 16].
ADD_SUB_CONFIG = """
max_batch_size = 8

[[input]]
name = "INPUT0"
data_type = "TYPE_INT32"
dims = [16]

[[input]]
name = "INPUT1"
data_type = "TYPE_INT32"
dims = [16]

[[output]]
name = "OUTPUT0"
data_type = "TYPE_INT32"
dims = [16]

[[output]]
name = "OUTPUT1"
data_type = "TYPE_INT32"
dims = [16]

[dynamic_batching]
max_queue_delay_microseconds = 100
"""

# Identity on a string tensor: whatever bytes go in come out.
IDENTITY_STRING_CONFIG = """
max_batch_size = 8

[[input]]
name = "INPUT0"
data_type = "TYPE_STRING"
dims = [-1]

[[output]]
name = "OUTPUT0"
data_type = "TYPE_STRING"
dims = [-1]
"""


def add_sub_model() -> bytes:
    shape = ["batch", 16]
    g = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
         helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])],
        "add_sub",
        [helper.make_tensor_value_info("INPUT0", TensorProto.INT32, shape),
         helper.make_tensor_value_info("INPUT1", TensorProto.INT32, shape)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.INT32, shape),
         helper.make_tensor_value_info("OUTPUT1", TensorProto.INT32, shape)],
    )
    m = helper.make_model(g, opset_imports=OPSET, ir_version=IR_VERSION)
    onnx.checker.check_model(m)
    return m.SerializeToString()


def identity_string_model() -> bytes:
    shape = ["batch", "n"]
    g = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity_string",
        [helper.make_tensor_value_info("INPUT0", TensorProto.STRING, shape)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.STRING, shape)],
    )
    m = helper.make_model(g, opset_imports=OPSET, ir_version=IR_VERSION)
    onnx.checker.check_model(m)
    return m.SerializeToString()


def write_model(repo: Path, name: str, config: str, model: bytes, version: int = 1) -> None:
    d = repo / name
    (d / str(version)).mkdir(parents=True, exist_ok=True)
    (d / "config.toml").write_text(config)
    (d / str(version) / "model.onnx").write_bytes(model)


def built_repository(repo: Path) -> Path:
    write_model(repo, "add_sub", ADD_SUB_CONFIG, add_sub_model())
    write_model(repo, "identity_string", IDENTITY_STRING_CONFIG, identity_string_model())
    return repo


@contextmanager
def serving(repo: Path, log: Path, *extra_args):
    """A `lattice serve` on `repo`; yields (http, grpc) addresses once ready."""
    cmd = [LATTICE_BIN, "serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
           "--metrics-port", "0", "--model-repository", str(repo),
           # A local test server: no credentials, no tenant limits, no audit files.
           "--auth", "off", "--rate-limits", "off", "--audit", "off", *extra_args]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=STARTUP_TIMEOUT_S)
        sel.close()
        assert ready, f"no 'lattice listening' line\n{log.read_text(errors='replace')[-3000:]}"
        line = proc.stdout.readline().decode().strip()
        assert line.startswith("lattice listening "), line
        addrs = dict(part.split("=", 1) for part in line.split()[2:])
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                if requests.get(f"http://{addrs['http']}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.05)
        yield addrs["http"], addrs["grpc"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        proc.stdout.close()
    assert code == 0, f"server exited with {code}\n{log.read_text(errors='replace')[-3000:]}"
