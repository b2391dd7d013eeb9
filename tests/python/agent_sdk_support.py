"""Helpers for the agent SDK tests: a `lattice serve` that can be SIGKILLed and
restarted on the same port and state, the SDK's worker and requester as separate
processes, and a TCP proxy that cuts connections on demand."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from conftest import LATTICE_BIN, ROOT, _log_tail, _read_listening_line

PROCS = Path(__file__).resolve().parent / "agent_sdk"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`lattice serve` with the agent plane on an embedded store in `state`."""

    def __init__(self, state: Path, extra: list[str] | None = None) -> None:
        self.state = state
        self.extra = extra or []
        self.grpc_port = 0
        self.http = ""
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        (state / "models").mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        log = self.state / f"lattice-{self.starts}.log"
        cmd = [
            LATTICE_BIN, "serve",
            "--host", "127.0.0.1",
            "--http-port", "0", "--grpc-port", str(self.grpc_port), "--metrics-port", "0",
            "--model-repository", str(self.state / "models"),
            "--memory-store", str(self.state / "agents.redb"),
            "--rate-limits", "off", "--audit", "off",
            "--heartbeat-ms", "1000",
            *self.extra,
        ]
        if "--auth" not in self.extra and "--api-keys" not in self.extra:
            cmd += ["--auth", "off"]
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f)
        try:
            line = _read_listening_line(self.proc, log)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        addrs = dict(part.split("=", 1) for part in line.split()[2:])
        self.grpc_port = int(addrs["grpc"].rsplit(":", 1)[1])
        self.http = addrs["http"]
        self.starts += 1
        self.log = log
        # The listening line comes before recovery and warm-up end; callers that
        # send work at once would get 503 "server is not ready", as a pod does
        # before its readiness probe passes.
        wait_for(self._ready, 60, "readiness of lattice serve", [self.proc])

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def tail(self) -> str:
        return _log_tail(self.log)


def spawn(script: str, *args: str, log: Path) -> subprocess.Popen:
    """One of the SDK processes under tests/python/agent_sdk, logging to `log`."""
    f = open(log, "wb")
    try:
        return subprocess.Popen([PY, str(PROCS / script), *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    finally:
        f.close()


def wait_for(pred, timeout: float, what: str, procs: list[subprocess.Popen] = ()) -> None:
    end = time.monotonic() + timeout
    while not pred():
        for p in procs:
            assert p.poll() is None, f"{p.args} exited with {p.returncode} while waiting for {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Proxy:
    """A TCP proxy on 127.0.0.1 (its own event loop thread) that `cut()` resets:
    every open connection is aborted, as a broken network path would."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.cuts = 0
        self.connections = 0
        self._conns: set[asyncio.StreamWriter] = set()
        self._live: set[object] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._down_until:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._conns.update((writer, up_w))
        conn = object()
        self._live.add(conn)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    if conn not in self._live:
                        continue  # frozen: bytes vanish, the connection stays open
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                w.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        finally:
            self._conns.discard(writer)
            self._conns.discard(up_w)

    _down_until = 0.0

    def freeze(self) -> None:
        """Every open connection turns into a black hole (open, nothing delivered),
        as a half-open path looks; new connections work."""
        self._loop.call_soon_threadsafe(self._live.clear)

    def cut(self, outage: float = 0.0) -> None:
        """Aborts every connection; with `outage`, refuses new ones for that long."""

        def abort_all() -> None:
            self._down_until = time.monotonic() + outage
            for w in list(self._conns):
                w.transport.abort()
            self._conns.clear()

        self._loop.call_soon_threadsafe(abort_all)
        self.cuts += 1

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for w in list(self._conns):
                w.transport.abort()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


__all__ = ["Proxy", "Serve", "free_port", "read_json", "spawn", "wait_for"]
