"""Helpers for the hostile-client suite (test_hostile.py): a private `lattice serve`
process with its own flags and log, a memory watchdog, metrics scraping, bounded
polling, raw HTTP/1.1 and HTTP/2 framing over plain sockets.

Everything here talks to 127.0.0.1 only and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from conftest import LATTICE_BIN, ROOT, _copy_repository, _log_tail, _read_listening_line

STARTUP_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 30

GiB = 1024**3
MiB = 1024**2


# --- bounded polling ----------------------------------------------------------------

def assert_eventually(check, timeout=20.0, step=0.05, what="condition"):
    """Calls `check()` until it returns a truthy value or stops raising
    AssertionError; fails with the last reason after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            got = check()
            if got is None or got:
                return got
            last = f"{what}: got {got!r}"
        except AssertionError as e:  # the check's own reason
            last = str(e)
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s: {last}")
        time.sleep(step)


# --- /proc -----------------------------------------------------------------------------

def proc_status_kib(pid: int, key: str) -> int:
    """A `key:  N kB` line of /proc/<pid>/status, in KiB (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


# --- the server process --------------------------------------------------------------------

@dataclass
class ServerProc:
    proc: subprocess.Popen
    log: Path
    http: str  # "127.0.0.1:PORT"
    grpc: str
    metrics: str
    flags: list
    rss_cap_bytes: int
    idle_rss_kib: int = 0
    watchdog_tripped: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _watchdog: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://{self.http}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n=40) -> str:
        return _log_tail(self.log, n)

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def hwm_kib(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")

    def start_watchdog(self, period=0.05):
        """Kills the server if its resident memory passes the hard cap, so that no
        case can take the machine's memory; the case then fails on `watchdog_tripped`."""

        def run():
            while not self._stop.wait(period):
                if not self.alive():
                    return
                rss = self.rss_kib() * 1024
                if rss > self.rss_cap_bytes:
                    self.watchdog_tripped = (
                        f"server RSS {rss / MiB:.0f} MiB passed the hard cap {self.rss_cap_bytes / MiB:.0f} MiB; killed"
                    )
                    self.proc.kill()
                    return

        self._watchdog = threading.Thread(target=run, name="rss-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> int | None:
        self._stop.set()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


def _serve_help() -> str:
    out = subprocess.run([LATTICE_BIN, "serve", "--help"], cwd=ROOT, capture_output=True, timeout=30)
    return out.stdout.decode(errors="replace")


def unknown_flags(flags) -> list:
    """The `--flags` of `flags` that `lattice serve --help` does not list."""
    text = _serve_help()
    names = [f for f in flags if isinstance(f, str) and f.startswith("--")]
    return [f for f in names if not re.search(re.escape(f) + r"(?![\w-])", text)]


def start_server(tmp: Path, flags, rss_cap_bytes=3 * GiB) -> ServerProc:
    """Starts `lattice serve` on port 0 everywhere, with a private copy of the
    models and state, its stderr in tmp/lattice.log; returns once ready."""
    repo = tmp / "model_repository"
    repo.mkdir(parents=True, exist_ok=True)
    _copy_repository(repo)
    log = tmp / "lattice.log"
    cmd = [
        LATTICE_BIN, "serve",
        "--host", "127.0.0.1",
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        "--model-repository", str(repo),
        "--memory-store", str(tmp / "agents.redb"),
        # Hostile clients send no credentials and many requests from one tenant: the
        # gateway's checks are tested in crates/server/tests/gateway.rs.
        "--auth", "off", "--rate-limits", "off", "--audit", str(tmp / "audit"),
        *flags,
    ]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file)
    try:
        try:
            line = _read_listening_line(proc, log)
        except RuntimeError as e:
            raise RuntimeError(f"lattice serve did not start with flags {flags}\n{e}") from None
        addrs = dict(part.split("=", 1) for part in line.split()[2:])
        srv = ServerProc(proc, log, addrs["http"], addrs["grpc"], addrs["metrics"], list(flags), rss_cap_bytes)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if not srv.alive():
                raise RuntimeError(f"server exited with {proc.returncode}\n{_log_tail(log)}")
            try:
                if requests.get(f"{srv.base_url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready within {STARTUP_TIMEOUT_S}s\n{_log_tail(log)}")
            time.sleep(0.05)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    srv.start_watchdog()
    return srv


# --- metrics ----------------------------------------------------------------------------

GAUGE_NAMES = (
    "inference_concurrent_requests",
    "ai_inference_pending_requests",
    "lattice_scaling_in_flight",
    "lattice_scaling_queue_depth",
)
GAUGE_PATTERN = re.compile(r"in_flight|concurrent|pending|queue_depth")


def scrape(metrics_addr: str) -> str:
    r = requests.get(f"http://{metrics_addr}/metrics", timeout=10)
    assert r.status_code == 200, r.status_code
    return r.text


def series_lines(text: str) -> list:
    return [l for l in text.splitlines() if l and not l.startswith("#")]


def busy_gauges(text: str) -> dict:
    """Every sample of a gauge that must be 0 at rest and is not: the named ones plus
    any gauge whose name contains in_flight / concurrent / pending / queue_depth."""
    gauges = set(GAUGE_NAMES)
    for l in text.splitlines():
        m = re.match(r"# TYPE (\S+) gauge", l)
        if m and GAUGE_PATTERN.search(m.group(1)):
            gauges.add(m.group(1))
    seen = set()
    busy = {}
    for l in series_lines(text):
        name = re.split(r"[{ ]", l, maxsplit=1)[0]
        if name in gauges:
            seen.add(name)
            value = float(l.rsplit(" ", 1)[1])
            if value != 0:
                busy[l.rsplit(" ", 1)[0]] = value
    missing = set(GAUGE_NAMES) - seen
    assert not missing, f"gauges missing from /metrics: {sorted(missing)}"
    return busy


def assert_gauges_zero(srv: ServerProc, timeout=20.0):
    def check():
        busy = busy_gauges(scrape(srv.metrics))
        assert not busy, f"gauges not back to 0: {busy}"

    assert_eventually(check, timeout=timeout, what="in-flight/queue gauges at 0")


# --- raw HTTP/1.1 ---------------------------------------------------------------------------

@dataclass
class RawResponse:
    status: int
    headers: dict  # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body)


def connect(addr: str, timeout=10.0) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    assert host == "127.0.0.1", addr
    s = socket.create_connection((host, int(port)), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(s: socket.socket, limit=64 * MiB) -> RawResponse:
    """One HTTP/1.1 response (content-length, chunked, or until close)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a full response head: {buf[:200]!r}")
        buf += chunk
        assert len(buf) < 1 * MiB, "response head too long"
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()

    def more():
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed inside a response body")
        return chunk

    if "content-length" in headers:
        n = int(headers["content-length"])
        assert n <= limit, f"response of {n} bytes"
        while len(rest) < n:
            rest += more()
        body = rest[:n]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += more()
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += more()
            body += rest[:size]
            rest = rest[size + 2:]
            assert len(body) <= limit
            if size == 0:
                break
    else:
        body = rest
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            body += chunk
            assert len(body) <= limit
    return RawResponse(status, headers, body)


def raw_request(addr: str, data: bytes, timeout=30.0) -> RawResponse:
    with connect(addr, timeout) as s:
        s.sendall(data)
        return read_response(s)


def http_request_bytes(method: str, path: str, body: bytes = b"", headers=None) -> bytes:
    h = {"host": "127.0.0.1", "content-length": str(len(body)), "connection": "close"}
    h.update({k.lower(): v for k, v in (headers or {}).items()})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return head.encode("latin-1") + body


def wait_closed(s: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closes (EOF or reset), or None if still open after
    `timeout`. Reads and discards whatever the server sends first (e.g. a 408)."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        s.settimeout(min(left, 0.5))
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError, OSError):
            return time.monotonic() - start
        if not chunk:
            return time.monotonic() - start


# --- raw HTTP/2 ----------------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = 0x4
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3


def h2_frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream & 0x7FFFFFFF) + payload


def h2_read_frame(s: socket.socket, buf: bytearray):
    """(type, flags, stream, payload) of the next frame; `buf` keeps leftover bytes."""
    while len(buf) < 9:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed while reading an HTTP/2 frame")
        buf += chunk
    length = int.from_bytes(buf[0:3], "big")
    ftype, flags = buf[3], buf[4]
    stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
    while len(buf) < 9 + length:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed inside an HTTP/2 frame")
        buf += chunk
    payload = bytes(buf[9:9 + length])
    del buf[:9 + length]
    return ftype, flags, stream, payload


def h2_server_settings(addr: str, timeout=10.0) -> dict:
    """Opens an h2c prior-knowledge connection and returns the parameters of the
    server's first (non-ACK) SETTINGS frame as {id: value}."""
    with connect(addr, timeout) as s:
        s.sendall(H2_PREFACE + h2_frame(H2_SETTINGS, 0, 0))
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ftype, flags, stream, payload = h2_read_frame(s, buf)
            if ftype == H2_SETTINGS and not flags & 0x1:
                return {
                    int.from_bytes(payload[i:i + 2], "big"): int.from_bytes(payload[i + 2:i + 6], "big")
                    for i in range(0, len(payload) - len(payload) % 6, 6)
                }
        raise AssertionError("no SETTINGS frame from the server")


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """'Literal header field without indexing, new name' with 7-bit lengths (no
    Huffman); enough for the short pseudo-headers and headers used here."""

    def string(b: bytes) -> bytes:
        n = len(b)
        if n < 127:
            return bytes([n]) + b
        out = bytearray([127])
        n -= 127
        while n >= 128:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
        return bytes(out) + b

    return b"\x00" + string(name) + string(value)


def grpc_raw_call(addr: str, path: str, message: bytes, extra_headers=(), timeout=20.0):
    """One unary gRPC call over a hand-made h2c connection. Returns
    (events, trailers) where events lists ('headers'|'data'|'rst'|'goaway', info)
    and trailers is a dict of the header blocks' literal fields we can decode
    (only non-indexed ones; enough to see that a response came back)."""
    headers = b"".join(
        hpack_literal(k, v)
        for k, v in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", addr.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *extra_headers,
        ]
    )
    body = b"\x00" + struct.pack(">I", len(message)) + message
    events = []
    with connect(addr, timeout) as s:
        s.sendall(
            H2_PREFACE
            + h2_frame(H2_SETTINGS, 0, 0)
            + h2_frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
            + h2_frame(0x0, 0x1, 1, body)  # DATA, END_STREAM
        )
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ftype, flags, stream, payload = h2_read_frame(s, buf)
            except (ConnectionError, OSError) as e:
                events.append(("closed", str(e)))
                break
            if ftype == H2_SETTINGS and not flags & 0x1:
                s.sendall(h2_frame(H2_SETTINGS, 0x1, 0))
            elif ftype == 0x1 and stream == 1:
                events.append(("headers", payload))
                if flags & 0x1:  # END_STREAM: trailers
                    break
            elif ftype == 0x0 and stream == 1:
                events.append(("data", payload))
            elif ftype == 0x3 and stream == 1:
                events.append(("rst", int.from_bytes(payload[:4], "big")))
                break
            elif ftype == 0x7:
                events.append(("goaway", int.from_bytes(payload[4:8], "big")))
                break
    return events
