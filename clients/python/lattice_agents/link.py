"""The agent side of `AgentCoordination.NegotiateTask`: one logical session over a
series of gRPC streams, the same protocol and guarantees as the orchestrator's own
Rust client.

A supervisor task owns the stream: it connects (rotating through the endpoints),
says `Hello` (resuming the session, with the last orchestrator seq processed and the
tasks still running here, after the first time), resends every frame the
orchestrator has not acknowledged, dedupes what arrives by high-water mark and
msg_id, acknowledges cumulatively, and on a cut, three missed heartbeat intervals or
a `Drain` reconnects with exponential backoff and full jitter (100 ms initial, 5 s
cap). `send` waits while the outbox is full, so a stalled orchestrator holds the
application back instead of growing memory; a task offer also waits for a credit of
the requester window (`Welcome.max_in_flight`), given back when its result arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from . import errors
from ._proto import agent_pb2 as pb
from ._proto.agent_pb2_grpc import AgentCoordinationStub
from .session import Inbox, Outbox, Verdict, new_msg_id, now_us

log = logging.getLogger("lattice_agents")

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Bounds on what the orchestrator asks for: the pause after a Drain, and the
# heartbeat interval (three missed ones end a stream).
MAX_DRAIN_PAUSE_S = 30.0
MAX_HEARTBEAT_MS = 60_000

# Bodies the orchestrator sends with a seq_no (kept, resent, deduped, acknowledged).
_UNSEQUENCED_RESPONSES = frozenset(
    {"heartbeat", "progress", "ack", "credit", "goodbye", "error", "welcome", "drain"}
)
# Handshake refusals that a retry cannot fix: the link stops and says why.
_FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def new_traceparent() -> str:
    """A W3C traceparent for a new, sampled trace."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def child_traceparent(parent: str) -> str:
    """The same trace with a new span id; a new trace if `parent` is not a traceparent."""
    parts = parent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return f"{parts[0]}-{parts[1]}-{os.urandom(8).hex()}-{parts[3]}"
    return new_traceparent()


@dataclass
class LinkConfig:
    """How to reach the orchestrator and who this agent is."""

    endpoints: Sequence[str]
    agent_id: str = field(default_factory=lambda: f"py-agent-{os.getpid()}-{os.urandom(3).hex()}")
    tenant: str = "default"
    capabilities: Sequence[str] = ()
    max_in_flight: int = 16
    token: str | None = None
    metadata: Sequence[tuple[str, str]] = ()
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    handshake_timeout: float = 5.0
    outbox_capacity: int = 4096
    # Largest frame sent, in bytes: the orchestrator's --max-body-bytes (16 MiB by
    # default). A larger one would be refused on every resend and wedge the session,
    # so `send` refuses it up front.
    max_frame_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, str):
            self.endpoints = [self.endpoints]
        if not self.endpoints:
            raise ValueError("at least one orchestrator endpoint is required")
        if not 1 <= self.max_in_flight <= 1_000_000:
            raise ValueError("max_in_flight must be 1..=1000000")
        if self.outbox_capacity < 1:
            raise ValueError("outbox_capacity must be at least 1")
        if not 1024 <= self.max_frame_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(f"max_frame_bytes must be 1024..={MAX_MESSAGE_BYTES}")


class LinkState(enum.Enum):
    CONNECTING = "connecting"
    ESTABLISHED = "established"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


class _LinkLost(Exception):
    def __init__(self, why: str, established: bool) -> None:
        super().__init__(why)
        self.established = established


def _target(endpoint: str) -> str:
    for scheme in ("http://", "grpc://"):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme) :].rstrip("/")
    return endpoint.rstrip("/")


class Link:
    """One agent session. `on_frame` receives every new reliable frame in order, and
    advisory progress frames; `on_lost` a task id whose offer the orchestrator had
    accepted in a session that is gone (GAP). Both run on the event loop and must
    not block."""

    def __init__(
        self,
        cfg: LinkConfig,
        on_frame: Callable[[pb.AgentResponse], None],
        on_lost: Callable[[str], None] = lambda _task_id: None,
    ) -> None:
        self.cfg = cfg
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._outbox: Outbox[pb.AgentMessage] = Outbox()
        self._inbox = Inbox()
        self._room = asyncio.Semaphore(cfg.outbox_capacity)
        self._offer_room = asyncio.Semaphore(0)
        self._window_known = False
        self._offered: set[str] = set()
        self._wake = asyncio.Event()
        self._session: tuple[str, int] | None = None
        self._delivered = 0
        self._goodbye: bool | None = None
        self._stop = asyncio.Event()
        self._closed = asyncio.Event()
        self._established = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._control: list[tuple[str, Any]] = []
        self._welcomed_before = False
        self.running: set[str] = set()
        self.state = LinkState.CONNECTING
        self.fatal: errors.LatticeError | None = None
        self.reconnects = 0
        self.drains = 0
        self.session_id: str | None = None
        self.orchestrator_id: str | None = None
        self.last_rtt_us = 0

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="lattice-link")

    async def established(self, timeout: float | None = None) -> str:
        """Waits until the link is up; raises the fatal error if it never can be."""
        waiter = asyncio.ensure_future(self._established.wait())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({waiter, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            closed.cancel()
        if self.fatal is not None:
            raise self.fatal
        if self._established.is_set() and self.session_id:
            return self.session_id
        if self._closed.is_set():
            raise errors.Unavailable("the agent link is closed")
        raise errors.Unavailable(f"no orchestrator reachable at {list(self.cfg.endpoints)} within {timeout} s")

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def unacked(self) -> int:
        return len(self._outbox)

    async def flush(self, timeout: float) -> bool:
        """Waits until every frame sent so far is acknowledged, or `timeout` passes."""
        end = time.monotonic() + timeout
        while len(self._outbox) > 0 and not self._closed.is_set():
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.005)
        return len(self._outbox) == 0

    async def close(self, cancel_pending: bool = False) -> None:
        """Ends the session: flush, `Goodbye` (cancelling pending tasks if asked), close."""
        if self._supervisor is None or self._closed.is_set():
            self._closed.set()
            return
        if self._established.is_set():
            await self.flush(5.0)
            self._goodbye = cancel_pending
            self._wake.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closed.wait(), 2.0)
        self.abort()
        with contextlib.suppress(asyncio.CancelledError):
            await self._supervisor

    def abort(self) -> None:
        """Drops the link without a goodbye, as a crash would."""
        self._stop.set()

    # --- sending -----------------------------------------------------------------

    async def send(
        self,
        body: str,
        msg: Any,
        *,
        priority: int = 2,
        deadline_us: int = 0,
        idempotency_key: str = "",
        correlation_id: str = "",
        traceparent: str = "",
    ) -> int:
        """Queues a reliable frame (`body` names its oneof field); returns its seq.
        Raises `OutOfRange` for a frame larger than `max_frame_bytes`."""
        # The envelope adds well under 1 KiB beyond the body.
        size = msg.ByteSize() + len(idempotency_key) + len(correlation_id) + len(traceparent) + 1024
        if size > self.cfg.max_frame_bytes:
            raise errors.OutOfRange(
                f"a {body} frame of about {size} bytes is over the {self.cfg.max_frame_bytes}-byte frame limit"
            )
        offer_id = msg.task_id if body == "offer" else None
        if offer_id is not None:
            await self._acquire(self._offer_room)
        await self._acquire(self._room)
        if offer_id is not None:
            # Recorded together with entering the outbox (no await in between): a
            # session lost meanwhile must not count an offer it never saw as accepted.
            self._offered.add(offer_id)

        def make(seq: int) -> pb.AgentMessage:
            frame = pb.AgentMessage(
                agent_id=self.cfg.agent_id,
                priority=cast(Any, priority),
                env=pb.Envelope(
                    msg_id=new_msg_id(),
                    seq_no=seq,
                    sent_at_us=now_us(),
                    deadline_us=deadline_us,
                    idempotency_key=idempotency_key,
                    correlation_id=correlation_id,
                    traceparent=traceparent,
                ),
            )
            getattr(frame, body).CopyFrom(msg)
            return frame

        seq, _ = self._outbox.push(make)
        self._wake.set()
        return seq

    def send_control(self, body: str, msg: Any) -> None:
        """An unsequenced frame (credit): sent on the current stream if any; losing it
        is harmless because `Hello` restates it on the next."""
        self._control.append((body, msg))
        self._wake.set()

    async def _acquire(self, sem: asyncio.Semaphore) -> None:
        if self._closed.is_set() or self._stop.is_set():
            raise self.fatal or errors.Unavailable("the agent link is closed")
        if not sem.locked():
            # Room now: taken without waiting (no task to watch for a close).
            await sem.acquire()
            return
        acquire = asyncio.ensure_future(sem.acquire())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not acquire.done():
                acquire.cancel()
        if acquire.done() and not acquire.cancelled():
            if self._stop.is_set():
                sem.release()
            else:
                return
        raise self.fatal or errors.Unavailable("the agent link is closed")

    # --- the supervisor ------------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        idx = 0
        try:
            while not self._stop.is_set():
                endpoint = self.cfg.endpoints[idx % len(self.cfg.endpoints)]
                try:
                    ended, after = await self._run_once(endpoint)
                    if ended in ("goodbye", "shutdown"):
                        break
                    # Drained: the next endpoint, after the pause the orchestrator asked for.
                    idx += 1
                    attempt = 0
                    self.state = LinkState.RECONNECTING
                    await self._pause(after)
                except errors.LatticeError as e:
                    self.fatal = e
                    log.error("orchestrator refused the agent stream: %s", e)
                    break
                except Exception as e:  # noqa: BLE001 - any failure of one stream means: reconnect
                    if not isinstance(e, (_LinkLost, grpc.aio.AioRpcError, asyncio.TimeoutError, OSError)):
                        log.warning("agent stream to %s failed unexpectedly: %r", endpoint, e)
                    if isinstance(e, _LinkLost) and e.established:
                        attempt = 0
                    log.debug("agent link to %s lost: %s: %s", endpoint, type(e).__name__, e)
                    idx += 1
                    attempt += 1
                    self.state = LinkState.RECONNECTING
                    self._established.clear()
                    # Full jitter keeps a fleet of agents from reconnecting in lockstep.
                    cap = min(self.cfg.initial_backoff * (2 ** min(attempt - 1, 16)), self.cfg.max_backoff)
                    await self._pause(random.uniform(0, cap))
        finally:
            self.state = LinkState.CLOSED
            self._established.clear()
            self._closed.set()
            self._stop.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _hello(self) -> pb.AgentMessage:
        resume = None
        if self._session is not None:
            resume = pb.Resume(
                session_id=self._session[0],
                epoch=self._session[1],
                last_received_seq=self._inbox.hwm,
                running_task_ids=sorted(self.running),
            )
        return pb.AgentMessage(
            agent_id=self.cfg.agent_id,
            env=pb.Envelope(msg_id=new_msg_id(), sent_at_us=now_us()),
            hello=pb.Hello(
                protocol_version=PROTOCOL_VERSION,
                capabilities=list(self.cfg.capabilities),
                max_in_flight=self.cfg.max_in_flight,
                tenant=self.cfg.tenant,
                resume=resume,
            ),
        )

    def _call_metadata(self) -> list[tuple[str, str]]:
        md = [("x-tenant", self.cfg.tenant), ("x-tenant-id", self.cfg.tenant)]
        if self.cfg.token:
            md.append(("authorization", f"Bearer {self.cfg.token}"))
        md.extend((k.lower(), v) for k, v in self.cfg.metadata)
        return md

    async def _run_once(self, endpoint: str) -> tuple[str, float]:
        channel = grpc.aio.insecure_channel(
            _target(endpoint),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Below common load-balancer idle timeouts (AWS ELB 60 s).
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.enable_retries", 0),
                # A new channel must open a new connection: from the process-wide pool
                # it would get the old one back, which may be the half-open connection
                # being left (found only by keepalive, tens of seconds later).
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        call = None
        try:
            stub = AgentCoordinationStub(channel)
            call = stub.NegotiateTask(metadata=self._call_metadata())

            async def handshake() -> Any:
                await call.write(self._hello())
                return await call.read()

            try:
                first = await asyncio.wait_for(handshake(), self.cfg.handshake_timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() in _FATAL_CODES:
                    raise errors.from_rpc_error(e) from None
                raise
            if first is grpc.aio.EOF or first.WhichOneof("body") != "welcome":
                raise _LinkLost(f"expected welcome, got {first!r}", False)
            self._welcomed(first.welcome)
            heartbeat = min(max(first.welcome.heartbeat_interval_ms, 100), MAX_HEARTBEAT_MS) / 1000
            sender = asyncio.ensure_future(self._sender(call, heartbeat))
            receiver = asyncio.ensure_future(self._receive(call, heartbeat * 3))
            watchdog = asyncio.ensure_future(self._watchdog(heartbeat * 3))
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait({sender, receiver, watchdog, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (sender, receiver, watchdog, stop):
                    t.cancel()
                # Collect every outcome, so none is reported as never retrieved.
                await asyncio.gather(sender, receiver, watchdog, stop, return_exceptions=True)
            if watchdog.done() and not watchdog.cancelled() and watchdog.exception() is not None:
                raise watchdog.exception()  # type: ignore[misc]
            if receiver.done() and not receiver.cancelled():
                exc = receiver.exception()
                if exc is not None:
                    if isinstance(exc, grpc.aio.AioRpcError):
                        raise _LinkLost(f"stream failed: {exc.code().name} {exc.details()}", True)
                    raise exc
                return receiver.result()
            if sender.done() and not sender.cancelled():
                exc = sender.exception()
                if exc is not None:
                    raise _LinkLost(f"sending failed: {exc}", True)
                return "goodbye", 0.0
            return "shutdown", 0.0
        finally:
            if call is not None:
                call.cancel()
            await channel.close(grace=None)

    def _welcomed(self, w: pb.Welcome) -> None:
        resumed = w.result == pb.RESUMED
        lost: list[str] = []
        if resumed:
            for _ in self._outbox.ack(w.last_received_seq):
                self._room.release()
        else:
            # A new session: the orchestrator knows none of our seqs or theirs.
            def renumber(frame: pb.AgentMessage, seq: int) -> None:
                frame.env.seq_no = seq

            self._outbox.renumber(renumber)
            self._inbox = Inbox()
            self._delivered = 0
            # Offers the old session accepted (no longer in the outbox) are lost with
            # it: say so, and give their credit back.
            unsent = {f.offer.task_id for _, f in self._outbox.pending() if f.WhichOneof("body") == "offer"}
            lost = [t for t in self._offered if t not in unsent]
            self._offered.difference_update(lost)
        if self._window_known:
            for _ in lost:
                self._offer_room.release()
        else:
            self._window_known = True
            for _ in range(max(w.max_in_flight, 1)):
                self._offer_room.release()
        self._session = (w.session_id, w.epoch)
        self.session_id = w.session_id
        self.orchestrator_id = w.orchestrator_id
        if self._welcomed_before:
            self.reconnects += 1
        self._welcomed_before = True
        self.state = LinkState.ESTABLISHED
        self._established.set()
        for task_id in lost:
            self._on_lost(task_id)

    async def _watchdog(self, miss: float) -> None:
        """Ends the stream when no frame arrived for `miss` seconds (three heartbeat
        intervals): a half-open connection looks alive to the transport."""
        while True:
            idle = time.monotonic() - self._last_frame
            if idle >= miss:
                raise _LinkLost("no frame within three heartbeat intervals", True)
            await asyncio.sleep(miss - idle)

    async def _receive(self, call: Any, miss: float) -> tuple[str, float]:
        self._last_frame = time.monotonic()
        while True:
            frame = await call.read()
            self._last_frame = time.monotonic()
            if frame is grpc.aio.EOF:
                raise _LinkLost("stream ended", True)
            env = frame.env
            if env.ack_seq > 0:
                for _ in self._outbox.ack(env.ack_seq):
                    self._room.release()
            kind = frame.WhichOneof("body")
            if kind is None:
                continue
            if kind in _UNSEQUENCED_RESPONSES:
                if kind == "heartbeat":
                    self._last_echo = frame.heartbeat.sent_at_us
                    if frame.heartbeat.echo_sent_at_us > 0:
                        self.last_rtt_us = max(now_us() - frame.heartbeat.echo_sent_at_us, 0)
                elif kind == "drain":
                    self.drains += 1
                    log.info("orchestrator drains this agent: %s", frame.drain.reason)
                    # Bounded: a pause of days from a confused peer would strand the agent.
                    return "drain", min(frame.drain.reconnect_after_ms / 1000, MAX_DRAIN_PAUSE_S)
                elif kind == "progress":
                    self._on_frame(frame)
                elif kind == "error":
                    log.warning("orchestrator error %s: %s", frame.error.code, frame.error.message)
                continue
            verdict = self._inbox.check(env.seq_no, env.msg_id, env.sent_at_us)
            if verdict is Verdict.NEW:
                # Acknowledged from here on: the frame is the application's.
                self._delivered = env.seq_no
                if kind == "result" and frame.result.task_id in self._offered:
                    self._offered.discard(frame.result.task_id)
                    self._offer_room.release()
                try:
                    self._on_frame(frame)
                except Exception:  # an application bug must not break the session
                    log.exception("agent frame handler failed on %s", kind)
                self._wake.set()
            elif verdict is Verdict.DUPLICATE:
                self._delivered = self._inbox.hwm
                self._wake.set()
            else:
                raise _LinkLost(f"bad frame from orchestrator: {verdict.value} at seq {env.seq_no}", True)

    _last_echo = 0
    _last_frame = 0.0

    async def _sender(self, call: Any, heartbeat: float) -> None:
        cursor = 0
        acked = 0
        last_sent = time.monotonic()
        while True:
            delivered = self._delivered
            if self._goodbye is not None:
                bye = pb.AgentMessage(
                    agent_id=self.cfg.agent_id,
                    env=pb.Envelope(msg_id=new_msg_id(), sent_at_us=now_us(), ack_seq=delivered),
                    goodbye=pb.Goodbye(reason="closing", cancel_pending=self._goodbye),
                )
                await call.write(bye)
                await call.done_writing()
                return
            while self._control:
                body, msg = self._control.pop(0)
                frame = pb.AgentMessage(
                    agent_id=self.cfg.agent_id,
                    env=pb.Envelope(msg_id=new_msg_id(), sent_at_us=now_us(), ack_seq=delivered),
                )
                getattr(frame, body).CopyFrom(msg)
                await call.write(frame)
            frames = [f for _, f in itertools.islice(self._outbox.after(cursor), 256)]
            if not frames and delivered <= acked:
                self._wake.clear()
                wait = heartbeat - (time.monotonic() - last_sent)
                if wait > 0:
                    # A timer rather than wait_for: no task per wait on the hot path.
                    timer = asyncio.get_running_loop().call_later(wait, self._wake.set)
                    try:
                        await self._wake.wait()
                    finally:
                        timer.cancel()
                    continue
                hb = pb.AgentMessage(
                    agent_id=self.cfg.agent_id,
                    env=pb.Envelope(msg_id=new_msg_id(), sent_at_us=now_us(), ack_seq=delivered),
                    heartbeat=pb.Heartbeat(
                        sent_at_us=now_us(), echo_sent_at_us=self._last_echo, in_flight=len(self.running)
                    ),
                )
                await call.write(hb)
                last_sent = time.monotonic()
                continue
            if not frames:
                await call.write(
                    pb.AgentMessage(
                        agent_id=self.cfg.agent_id,
                        env=pb.Envelope(msg_id=new_msg_id(), sent_at_us=now_us(), ack_seq=delivered),
                        ack=pb.Ack(),
                    )
                )
            for f in frames:
                cursor = f.env.seq_no
                delivered = self._delivered
                f.env.ack_seq = delivered
                await call.write(f)
            acked = delivered
            last_sent = time.monotonic()
