#!/usr/bin/env python3
"""Large-tensor throughput: system shared memory against the binary tensor extension
(REST) and raw contents (gRPC), in one run, on one `lattice serve`.

The model is an FP32 Identity on [1, N] built here with the `onnx` package, so the
engine costs next to nothing and the figure is the transport. Each request moves N*4
bytes in and N*4 bytes out, with the stock `tritonclient`:

  http-binary  input and output in the body (binary tensor extension)
  grpc-raw     raw_input_contents / raw_output_contents
  http-shm     input written into a registered region (tritonclient.utils.shared_memory),
  grpc-shm     output written by the server into another region; only JSON/protobuf
               metadata crosses the socket

The client's own copy into the region is timed (the tensor starts in the client's
memory, as it does for the socket modes); outputs are read as views either way.
Modes are interleaved in mirrored order over several rounds; each round takes the
median request time of each mode; the report gives the median over rounds of
throughput (MiB/s of input + output) and the ratios against the socket modes.

  .venv/bin/python bench/shm/run.py [--lattice target/release/lattice] [--mib 4,32]
"""

import argparse
import os
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
max_batch_size = 1

[[input]]
name = "INPUT0"
data_type = "TYPE_FP32"
dims = [-1]

[[output]]
name = "OUTPUT0"
data_type = "TYPE_FP32"
dims = [-1]
"""

MODES = ["http-binary", "http-shm", "grpc-raw", "grpc-shm"]


def identity_model() -> bytes:
    shape = ["batch", "n"]
    g = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity_fp32",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, shape)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m)
    return m.SerializeToString()


def start_server(binary: str, repo: Path, log: Path, max_bytes: int):
    cmd = [binary, "serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
           "--metrics-port", "0", "--model-repository", str(repo), "--auth", "off",
           "--rate-limits", "off", "--audit", "off", "--agents", "off",
           "--max-body-bytes", str(max_bytes), "--max-response-bytes", str(max_bytes)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(log, "wb"))
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=60):
        proc.kill()
        sys.exit(f"server did not start:\n{log.read_text()[-2000:]}")
    line = proc.stdout.readline().decode().strip()
    addrs = dict(part.split("=", 1) for part in line.split()[2:])
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"http://{addrs['http']}/v2/health/ready", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            sys.exit(f"server not ready:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, addrs["http"], addrs["grpc"]


class Runner:
    def __init__(self, http_addr, grpc_addr, n):
        self.n = n
        self.nbytes = n * 4
        self.x = np.random.default_rng(1).standard_normal((1, n), dtype=np.float32)
        self.http = httpclient.InferenceServerClient(http_addr, connection_timeout=300, network_timeout=300)
        self.grpc = grpcclient.InferenceServerClient(grpc_addr)
        tag = uuid.uuid4().hex[:8]
        self.in_h = shm.create_shared_memory_region("bench_in", f"/lattice_bench_in_{tag}", self.nbytes)
        self.out_h = shm.create_shared_memory_region("bench_out", f"/lattice_bench_out_{tag}", self.nbytes)
        self.http.unregister_system_shared_memory()
        self.http.register_system_shared_memory("bench_in", f"/lattice_bench_in_{tag}", self.nbytes)
        self.http.register_system_shared_memory("bench_out", f"/lattice_bench_out_{tag}", self.nbytes)

    def close(self):
        self.http.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(self.in_h)
        shm.destroy_shared_memory_region(self.out_h)

    def once(self, mode):
        """One request; returns the output as an array (a view where possible)."""
        mod = httpclient if mode.startswith("http") else grpcclient
        client = self.http if mode.startswith("http") else self.grpc
        inp = mod.InferInput("INPUT0", [1, self.n], "FP32")
        out = mod.InferRequestedOutput("OUTPUT0")
        if mode.endswith("shm"):
            shm.set_shared_memory_region(self.in_h, [self.x])
            inp.set_shared_memory("bench_in", self.nbytes)
            out.set_shared_memory("bench_out", self.nbytes)
            client.infer("identity", [inp], outputs=[out])
            return shm.get_contents_as_numpy(self.out_h, np.float32, [1, self.n])
        inp.set_data_from_numpy(self.x)
        return client.infer("identity", [inp], outputs=[out]).as_numpy("OUTPUT0")

    def round(self, mode, iters):
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.once(mode)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lattice", default=os.environ.get("LATTICE_BIN", str(ROOT / "target/release/lattice")))
    ap.add_argument("--mib", default="4,32", help="tensor sizes in MiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--iters", type=int, default=10, help="requests per mode per round")
    args = ap.parse_args()
    sizes = [float(s) for s in args.mib.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        (repo / "identity" / "1").mkdir(parents=True)
        (repo / "identity" / "config.toml").write_text(CONFIG)
        (repo / "identity" / "1" / "model.onnx").write_bytes(identity_model())
        max_bytes = int(max(sizes) * 2**20) + (1 << 20)
        proc, http_addr, grpc_addr = start_server(args.lattice, repo, Path(tmp) / "server.log", max_bytes)
        try:
            print(f"lattice: {args.lattice}; rounds {args.rounds} x {args.iters} requests per mode")
            print(f"{'MiB':>6} {'mode':<12} {'median ms':>10} {'MiB/s (in+out)':>15}")
            for mib in sizes:
                n = int(mib * 2**20) // 4
                r = Runner(http_addr, grpc_addr, n)
                try:
                    for mode in MODES:  # correctness and warm-up
                        np.testing.assert_array_equal(r.once(mode), r.x)
                    per = {m: [] for m in MODES}
                    for i in range(args.rounds):
                        order = MODES if i % 2 == 0 else MODES[::-1]
                        for m in order:
                            per[m].append(r.round(m, args.iters))
                    med = {m: statistics.median(v) for m, v in per.items()}
                    for m in MODES:
                        print(f"{mib:>6g} {m:<12} {med[m] * 1e3:>10.2f} {2 * mib / med[m]:>15.0f}")
                    # Ratios per round (same round, same machine state), then the median.
                    def ratio(a, b):
                        return statistics.median(pb / pa for pa, pb in zip(per[a], per[b]))
                    print(f"{mib:>6g} ratio http-shm / http-binary throughput: {ratio('http-shm', 'http-binary'):.2f}x")
                    print(f"{mib:>6g} ratio grpc-shm / grpc-raw    throughput: {ratio('grpc-shm', 'grpc-raw'):.2f}x")
                finally:
                    r.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
