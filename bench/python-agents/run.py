"""What the agent protocol's reliability costs a Python agent: tasks/s of one Python
handler as a Lattice worker (SDK requester -> `lattice serve` orchestrator -> SDK
worker, every frame sequenced, persisted, acknowledged) against the same handler
behind a plain asyncio gRPC bidi stream (client -> server, nothing persisted), in the
same run, alternating rounds; medians and their ratio are printed.

usage: run.py [--tasks 2000] [--concurrency 64] [--rounds 3] [--lattice BIN]
(the server and worker sides run as child processes of this script)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[2]
METHOD = "/lattice.bench.v1.PyEcho/Run"


async def handler(ctx: object, args: dict) -> dict:
    """The handler both sides run: a little CPU and an await, like a thin agent step."""
    await asyncio.sleep(0)
    return {"n": args["n"], "digest": sum(range(args["n"] % 200))}


class _Ctx:
    """What the plain echo hands the handler instead of a TaskContext."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id


# --- the sides that run in child processes ------------------------------------------


def serve_worker(endpoint: str, ready: Path) -> None:
    from lattice_agents import Worker

    worker = Worker([endpoint], max_in_flight=128)
    worker.task("bench")(handler)

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await worker.start()
        ready.write_text("ok")
        await worker.serve(stop)

    asyncio.run(main())


def serve_echo(ready: Path) -> None:
    async def run(request_iterator, context):
        async for raw in request_iterator:
            req = json.loads(raw)
            out = await handler(_Ctx(req["id"]), req["args"])
            yield json.dumps({"id": req["id"], "output": out}).encode()

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("lattice.bench.v1.PyEcho", {"Run": grpc.stream_stream_rpc_method_handler(run)}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.write_text(str(port))
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())


# --- the clients, in this process ------------------------------------------------------


async def round_lattice(endpoint: str, tasks: int, concurrency: int, tag: str) -> float:
    from lattice_agents import Requester

    async with Requester([endpoint]) as r:
        it = iter(range(tasks))

        async def lane() -> None:
            for i in it:
                out = await r.submit("bench", {"n": i}, idempotency_key=f"{tag}-{i}")
                assert out["n"] == i

        t0 = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return tasks / (time.perf_counter() - t0)


async def round_echo(port: int, tasks: int, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream(METHOD)()
        window = asyncio.Semaphore(concurrency)
        got = 0

        async def reader() -> None:
            nonlocal got
            while got < tasks:
                raw = await call.read()
                assert raw is not grpc.aio.EOF
                json.loads(raw)
                got += 1
                window.release()

        t0 = time.perf_counter()
        rd = asyncio.ensure_future(reader())
        for i in range(tasks):
            await window.acquire()
            await call.write(json.dumps({"id": f"t{i}", "args": {"n": i}}).encode())
        await rd
        await call.done_writing()
        return tasks / (time.perf_counter() - t0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_file(path: Path, proc: subprocess.Popen, timeout: float = 30) -> str:
    end = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        if time.monotonic() > end:
            raise SystemExit(f"{proc.args} not ready within {timeout} s")
        time.sleep(0.02)
    return path.read_text()


async def rounds(a: argparse.Namespace, endpoint: str, port: int, serve_pid: int, worker_pid: int) -> None:
    # One warm-up round each (connections, the orchestrator's lanes, caches).
    await round_lattice(endpoint, min(200, a.tasks), a.concurrency, "warm")
    await round_echo(port, min(200, a.tasks), a.concurrency)
    lat, plain = [], []
    cpu = {"lattice serve": 0.0, "python worker": 0.0, "python requester": 0.0}
    for r in range(a.rounds):
        before = (cpu_seconds(serve_pid), cpu_seconds(worker_pid), time.process_time())
        lat.append(await round_lattice(endpoint, a.tasks, a.concurrency, f"r{r}"))
        after = (cpu_seconds(serve_pid), cpu_seconds(worker_pid), time.process_time())
        for k, b, e in zip(cpu, before, after):
            cpu[k] += e - b
        plain.append(await round_echo(port, a.tasks, a.concurrency))
        print(f"round {r + 1}: lattice {lat[-1]:8.0f} tasks/s   plain asyncio gRPC {plain[-1]:8.0f} tasks/s")
    ml, mp = statistics.median(lat), statistics.median(plain)
    print(f"median over {a.rounds} rounds of {a.tasks} tasks at concurrency {a.concurrency}: "
          f"lattice {ml:.0f} tasks/s, plain {mp:.0f} tasks/s, ratio lattice/plain {ml / mp:.2f}")
    n = a.rounds * a.tasks
    print("CPU per task through lattice: " + ", ".join(f"{k} {v / n * 1e6:.0f} us" for k, v in cpu.items()))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return serve_worker(sys.argv[2], Path(sys.argv[3]))
    if len(sys.argv) > 1 and sys.argv[1] == "echo":
        return serve_echo(Path(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    default_bin = os.environ.get("LATTICE_BIN") or next(
        (str(p) for p in (ROOT / "target/release/lattice", ROOT / "target/debug/lattice") if p.exists()), "lattice"
    )
    ap.add_argument("--lattice", default=default_bin)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-python-agents-"))
    (tmp / "models").mkdir()
    serve = subprocess.Popen(
        [a.lattice, "serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
         "--model-repository", str(tmp / "models"), "--memory-store", str(tmp / "agents.redb"),
         "--auth", "off", "--rate-limits", "off", "--audit", "off"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=open(tmp / "lattice.log", "wb"),
    )
    procs = [serve]
    try:
        line = serve.stdout.readline().decode()
        addrs = dict(p.split("=", 1) for p in line.split()[2:])
        endpoint = f"http://{addrs['grpc']}"
        worker = subprocess.Popen([sys.executable, __file__, "worker", endpoint, str(tmp / "worker.ready")], cwd=ROOT)
        echo = subprocess.Popen([sys.executable, __file__, "echo", str(tmp / "echo.ready")], cwd=ROOT)
        procs += [worker, echo]
        wait_file(tmp / "worker.ready", worker)
        port = int(wait_file(tmp / "echo.ready", echo))
        # grpc.aio wants one event loop per process: every round runs on this one.
        asyncio.run(rounds(a, endpoint, port, serve.pid, worker.pid))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
