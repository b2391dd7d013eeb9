"""A worker: functions registered per capability, run for each task the orchestrator
assigns, each answered with one result.

A handler gets a `TaskContext` and the task's arguments (the payload as offered,
decoded from JSON unless registered with `raw=True`) and returns any JSON value. A
`Cancel` from the requester cancels the handler's asyncio task (it sees
`asyncio.CancelledError` at its next await) and sets `ctx.cancelled`; the task's
deadline does the same and answers DEADLINE_EXCEEDED. The task id is the idempotency
key: a task the orchestrator runs twice (its first worker presumed dead, or the
orchestrator restarted) must key its side effects on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from google.rpc import status_pb2

from . import errors
from ._proto import agent_pb2 as pb
from .agent import Agent, MemoryResult
from .link import child_traceparent

log = logging.getLogger("lattice_agents")

Handler = Callable[["TaskContext", Any], Awaitable[Any]]
H = TypeVar("H", bound=Handler)


@dataclass
class TaskContext:
    """What a handler knows about its task, and what it may do."""

    task_id: str
    capability: str
    attempt: int
    priority: int
    tenant: str
    # Absolute deadline in seconds since the epoch, None if the task has none.
    deadline: float | None
    # The W3C traceparent of this run (a child span of the task's).
    traceparent: str
    payload: bytes
    # Set when the requester cancels the task (or its deadline passes).
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # `time.monotonic()` when the cancel frame reached this worker.
    cancel_received_at: float | None = None
    _worker: Worker | None = field(default=None, repr=False)
    _tool_calls: int = 0

    @property
    def idempotency_key(self) -> str:
        """Key side effects on this: a task runs again only under the same id."""
        return self.task_id

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.time())

    async def progress(self, fraction: float, note: str = "") -> None:
        """Reports progress to the requester (advisory: a detached requester misses it)."""
        assert self._worker is not None
        await self._worker.link.send(
            "progress",
            pb.TaskProgress(task_id=self.task_id, fraction=max(0.0, min(float(fraction), 1.0)), note=note[:1024]),
            priority=self.priority,
            correlation_id=self.task_id,
            traceparent=self.traceparent,
        )

    async def call_tool(self, tool: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """A gateway tool call that inherits the task's deadline and trace, and is
        cancelled with the task. Its idempotency key is the task id and the call's
        ordinal within the task, so a rerun of the task repeats no effect."""
        assert self._worker is not None
        self._tool_calls += 1
        key = self.task_id if self._tool_calls == 1 else f"{self.task_id}#{self._tool_calls}"
        return await self._worker.call_tool(
            tool,
            arguments,
            idempotency_key=key,
            timeout=timeout,
            deadline_us=int(self.deadline * 1e6) if self.deadline else 0,
            task_id=self.task_id,
            traceparent=self.traceparent,
            priority=self.priority,
        )

    async def memory_get(self, memory_ref: str, block_ids: Sequence[str]) -> MemoryResult:
        assert self._worker is not None
        return await self._worker.memory_get(memory_ref, block_ids, traceparent=self.traceparent)

    async def memory_put(self, memory_ref: str, block_id: str, value: bytes, *, expected_version: int = 0) -> MemoryResult:
        """A memory write keyed on the task id and block: a rerun writes once."""
        assert self._worker is not None
        return await self._worker.memory_put(
            memory_ref,
            block_id,
            value,
            expected_version=expected_version,
            idempotency_key=f"{self.task_id}/{memory_ref}/{block_id}",
            traceparent=self.traceparent,
        )

    async def memory_sync(self, memory_ref: str, since_version: int = 0) -> MemoryResult:
        assert self._worker is not None
        return await self._worker.memory_sync(memory_ref, since_version, traceparent=self.traceparent)


@dataclass
class _Registered:
    handler: Handler
    raw: bool


class Worker(Agent):
    """`worker = Worker(endpoints)`, then `@worker.task("capability")` on async
    functions, then `await worker.serve()` (or `worker.run()` from sync code)."""

    def __init__(self, endpoints: Sequence[str] | str, capabilities: Sequence[str] = (), **kw: Any) -> None:
        super().__init__(endpoints, capabilities=capabilities, **kw)
        self._handlers: dict[str, _Registered] = {}
        self._running: dict[str, tuple[asyncio.Task[Any], TaskContext]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.completed = 0
        self._closing = False

    def task(self, capability: str, *, raw: bool = False) -> Callable[[H], H]:
        """Registers an async handler for a capability. With `raw=True` it receives
        the payload bytes as offered and may return bytes."""
        if not capability or len(capability) > 256:
            raise ValueError("capability must be 1..=256 characters")

        def register(fn: H) -> H:
            if not inspect.iscoroutinefunction(cast(Any, fn)):
                raise TypeError(f"{fn!r} must be an async function")
            if self._link is not None:
                raise RuntimeError("register handlers before the worker starts (Hello lists the capabilities)")
            self._handlers[capability] = _Registered(fn, raw)
            if capability not in self._cfg.capabilities:
                self._cfg.capabilities = [*self._cfg.capabilities, capability]
            return fn

        return register

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def set_max_in_flight(self, n: int) -> None:
        """Changes how many tasks the orchestrator may assign at once (a `Credit`)."""
        if not 1 <= n <= 1_000_000:
            raise ValueError("max_in_flight must be 1..=1000000")
        self._cfg.max_in_flight = n
        self.link.send_control("credit", pb.Credit(max_in_flight=n))

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Runs until `stop` is set (or the link fails for good), then leaves with a
        goodbye after the running tasks finish or are cancelled."""
        await self.start(wait=None)
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(self.link.wait_closed())}
        if stop is not None:
            waits.add(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await self.close()
        if self.link.fatal is not None:
            raise self.link.fatal

    async def close(self, cancel_pending: bool = False) -> None:
        # Running tasks are cancelled and answered UNAVAILABLE, which the orchestrator
        # retries on another worker (their effects are keyed on the task id).
        self._closing = True
        for task, _ in list(self._running.values()):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        await super().close(cancel_pending)

    def run(self) -> None:
        """Blocking: serves until SIGINT or SIGTERM."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
            await self.serve(stop)

        asyncio.run(main())

    # --- frames ----------------------------------------------------------------

    def _on_frame(self, kind: str | None, frame: pb.AgentResponse) -> None:
        if kind == "assign":
            self._assign(frame.assign, frame.env)
        elif kind == "cancel":
            running = self._running.get(frame.cancel.task_id)
            if running is not None:
                task, ctx = running
                if ctx.cancel_received_at is None:
                    ctx.cancel_received_at = time.monotonic()
                ctx.cancelled.set()
                task.cancel()

    def _assign(self, a: pb.TaskAssign, env: pb.Envelope) -> None:
        if a.task_id in self._running:
            # Assigned again while still running here: the running one answers.
            return
        ctx = TaskContext(
            task_id=a.task_id,
            capability=a.capability,
            attempt=a.attempt,
            priority=a.priority,
            tenant=a.tenant,
            deadline=env.deadline_us / 1e6 if env.deadline_us > 0 else None,
            traceparent=child_traceparent(env.traceparent),
            payload=a.payload,
            _worker=self,
        )
        reg = self._handlers.get(a.capability)
        handler = asyncio.ensure_future(self._invoke(reg, ctx))
        self._running[a.task_id] = (handler, ctx)
        self.link.running.add(a.task_id)
        runner = asyncio.ensure_future(self._finish(handler, ctx, a))
        self._tasks.add(runner)
        runner.add_done_callback(self._tasks.discard)

    async def _invoke(self, reg: _Registered | None, ctx: TaskContext) -> Any:
        if reg is None:
            raise errors.Unimplemented(f"this worker has no handler for capability '{ctx.capability}'")
        if reg.raw:
            args: Any = ctx.payload
        elif not ctx.payload:
            args = None
        else:
            try:
                args = json.loads(ctx.payload)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise errors.InvalidArgument(f"task payload is not JSON: {e}") from None
        return await reg.handler(ctx, args)

    async def _finish(self, handler: asyncio.Task[Any], ctx: TaskContext, a: pb.TaskAssign) -> None:
        output = b""
        status: tuple[int, str] = (0, "")
        timed_out = False
        try:
            remaining = ctx.remaining()
            if remaining is not None:
                done, _ = await asyncio.wait({handler}, timeout=remaining)
                if not done:
                    timed_out = True
                    ctx.cancelled.set()
                    handler.cancel()
                    with contextlib.suppress(BaseException):
                        await handler
            else:
                await asyncio.wait({handler})
            if timed_out:
                status = (errors.DeadlineExceeded.code.value[0], "task deadline passed")
            elif ctx.cancel_received_at is not None:
                status = (errors.Cancelled.code.value[0], "cancelled")
            elif handler.cancelled():
                msg = "the worker is shutting down" if self._closing else "the handler was cancelled"
                status = (errors.Unavailable.code.value[0], msg)
            elif (exc := handler.exception()) is not None:
                if isinstance(exc, errors.LatticeError):
                    status = (exc.code.value[0], exc.message)
                else:
                    status = (errors.Unknown.code.value[0], f"{type(exc).__name__}: {exc}"[:4096])
            else:
                out = handler.result()
                if isinstance(out, (bytes, bytearray, memoryview)):
                    output = bytes(out)
                else:
                    try:
                        output = json.dumps(out).encode()
                    except (TypeError, ValueError) as e:
                        status = (errors.Internal.code.value[0], f"handler result is not JSON: {e}")
            def result(output: bytes, status: tuple[int, str]) -> pb.TaskResult:
                return pb.TaskResult(
                    task_id=a.task_id,
                    output=output,
                    status=_status(*status),
                    attempts=a.attempt,
                    worker_id=self.agent_id,
                    route=a.route,
                )

            opts: dict[str, Any] = {"priority": a.priority, "correlation_id": a.task_id, "traceparent": ctx.traceparent}
            try:
                await self.link.send("result", result(output, status), **opts)
            except errors.OutOfRange as e:
                # Too large to send: the task fails with a small result saying so.
                over = (errors.ResourceExhausted.code.value[0], f"the handler's result is too large: {e.message}")
                with contextlib.suppress(errors.LatticeError):
                    await self.link.send("result", result(b"", over), **opts)
            except errors.LatticeError:
                pass
            self.completed += 1
        finally:
            self._running.pop(a.task_id, None)
            self.link.running.discard(a.task_id)


def _status(code: int, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message)


__all__ = ["Handler", "TaskContext", "Worker"]
