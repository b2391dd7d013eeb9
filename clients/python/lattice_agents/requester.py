"""A requester: offers tasks to the workers of a capability and awaits their results.

`await requester.submit(capability, payload)` returns the worker's JSON result or
raises the typed error of its status (`lattice_agents.errors`). The task id is the
idempotency key: the orchestrator ignores an offer whose id it already holds, and a
worker keys its side effects on it, so a retried submit with the same key is the
same task. Cancelling the awaiting coroutine (or `TaskHandle.cancel()`) sends a
`Cancel`: the worker's handler is cancelled and the task answers CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import errors
from ._proto import agent_pb2 as pb
from .agent import Agent, Priority, deadline_us_of
from .link import new_traceparent


# How long past a task's deadline a requester waits for the orchestrator's answer.
DEADLINE_GRACE_S = 2.0


@dataclass(frozen=True)
class Progress:
    fraction: float
    note: str


@dataclass
class _Offer:
    capability: str
    payload: bytes
    priority: int
    deadline_us: int
    max_attempts: int
    traceparent: str


class TaskHandle:
    """A task offered and not yet answered."""

    def __init__(self, requester: Requester, task_id: str, raw: bool, deadline_us: int = 0) -> None:
        self.task_id = task_id
        self._deadline_us = deadline_us
        self._requester = requester
        self._raw = raw
        self._future: asyncio.Future[pb.TaskResult] = asyncio.get_running_loop().create_future()
        # Advisory progress reports; the oldest are dropped past 64.
        self.progress: asyncio.Queue[Progress] = asyncio.Queue(maxsize=64)
        self.worker_id = ""
        self.attempts = 0

    def done(self) -> bool:
        return self._future.done()

    async def result(self) -> Any:
        """The task's output (decoded JSON; bytes with `raw=True`), or its typed error."""
        if self._deadline_us > 0 and not self._future.done():
            # The orchestrator answers a task past its deadline; this guard is for an
            # orchestrator out of reach: past the deadline and a grace, give up here.
            wait = max(self._deadline_us / 1e6 - time.time(), 0.0) + DEADLINE_GRACE_S
            try:
                await asyncio.wait_for(asyncio.shield(self._future), wait)
            except asyncio.TimeoutError:
                self._requester._pending.pop(self.task_id, None)
                with contextlib.suppress(errors.LatticeError):
                    await self.cancel("the requester gave up after the deadline")
                raise errors.DeadlineExceeded(
                    "no answer by the task's deadline (the orchestrator was out of reach)", task_id=self.task_id
                ) from None
        r = await asyncio.shield(self._future)
        self.worker_id = r.worker_id
        self.attempts = r.attempts
        err = errors.from_status(r.status if r.HasField("status") else None, task_id=self.task_id)
        if err is not None:
            raise err
        if self._raw:
            return bytes(r.output)
        if not r.output:
            return None
        try:
            return json.loads(r.output)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return bytes(r.output)

    async def cancel(self, reason: str = "cancelled by the requester") -> None:
        await self._requester.cancel(self.task_id, reason)

    def __await__(self) -> Any:
        return self.result().__await__()


class Requester(Agent):
    """Offers tasks and awaits results. `async with Requester(endpoints) as r:`."""

    def __init__(self, endpoints: Sequence[str] | str, **kw: Any) -> None:
        super().__init__(endpoints, **kw)
        self._pending: dict[str, tuple[TaskHandle, _Offer]] = {}
        # Results for a task not (or no longer) awaited here: stays 0 when every task
        # is answered exactly once.
        self.stray_results = 0
        self.reoffered = 0

    async def offer(
        self,
        capability: str,
        payload: Any = None,
        *,
        priority: int = Priority.NORMAL,
        deadline: float | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        max_attempts: int = 0,
        traceparent: str | None = None,
        raw: bool = False,
    ) -> TaskHandle:
        """Offers a task and returns its handle once the offer is queued (after a
        credit of the requester window is free). `payload` is sent as is if bytes,
        else as JSON; `deadline` is absolute (epoch seconds), `timeout` relative."""
        if not capability or len(capability) > 256:
            raise ValueError("capability must be 1..=256 characters")
        if not 0 <= int(priority) <= 5:
            raise ValueError("priority must be 0..=5")
        if not 0 <= max_attempts <= 1000:
            raise ValueError("max_attempts must be 0..=1000")
        task_id = idempotency_key or os.urandom(16).hex()
        if task_id in self._pending:
            raise errors.AlreadyExists(f"task '{task_id}' is already awaited here", task_id=task_id)
        body = bytes(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else json.dumps(payload).encode()
        o = _Offer(
            capability=capability,
            payload=body,
            priority=int(priority),
            deadline_us=deadline_us_of(deadline, timeout),
            max_attempts=max_attempts,
            traceparent=traceparent or new_traceparent(),
        )
        handle = TaskHandle(self, task_id, raw, o.deadline_us)
        self._pending[task_id] = (handle, o)
        try:
            if o.deadline_us > 0:
                # Waiting for a credit or for room ends with the deadline too.
                wait = max(o.deadline_us / 1e6 - time.time(), 0.0) + DEADLINE_GRACE_S
                try:
                    await asyncio.wait_for(self._send_offer(task_id, o), wait)
                except asyncio.TimeoutError:
                    raise errors.DeadlineExceeded(
                        "the task could not be offered by its deadline (no orchestrator in reach)", task_id=task_id
                    ) from None
            else:
                await self._send_offer(task_id, o)
        except BaseException:
            self._pending.pop(task_id, None)
            raise
        return handle

    async def _send_offer(self, task_id: str, o: _Offer) -> None:
        await self.link.send(
            "offer",
            pb.TaskOffer(task_id=task_id, capability=o.capability, payload=o.payload, max_attempts=o.max_attempts),
            priority=o.priority,
            deadline_us=o.deadline_us,
            correlation_id=task_id,
            traceparent=o.traceparent,
        )

    async def submit(self, capability: str, payload: Any = None, **kw: Any) -> Any:
        """Offers a task and awaits its result; cancelling this coroutine cancels the task."""
        handle = await self.offer(capability, payload, **kw)
        try:
            return await handle.result()
        except asyncio.CancelledError:
            if not handle.done():
                with contextlib.suppress(errors.LatticeError):
                    await asyncio.shield(self.cancel(handle.task_id, "the awaiting coroutine was cancelled"))
            raise

    async def cancel(self, task_id: str, reason: str = "cancelled by the requester") -> None:
        """Sends a `Cancel` for a task this requester offered."""
        await self.link.send(
            "cancel",
            pb.Cancel(task_id=task_id, reason=reason[:1024]),
            correlation_id=task_id,
        )

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def _on_frame(self, kind: str | None, frame: pb.AgentResponse) -> None:
        if kind == "result":
            entry = self._pending.pop(frame.result.task_id, None)
            if entry is None or entry[0].done():
                self.stray_results += 1
                return
            entry[0]._future.set_result(frame.result)
        elif kind == "progress":
            entry = self._pending.get(frame.progress.task_id)
            if entry is not None:
                q = entry[0].progress
                if q.full():
                    q.get_nowait()
                q.put_nowait(Progress(frame.progress.fraction, frame.progress.note))

    def _lost(self, task_id: str) -> None:
        # The session that accepted the offer is gone: offer it again under the same
        # id (the worker keys its effects on it, so a rerun repeats none).
        entry = self._pending.get(task_id)
        if entry is None:
            return
        self.reoffered += 1
        fut = asyncio.ensure_future(self._send_offer(task_id, entry[1]))
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def close(self, cancel_pending: bool = False) -> None:
        await super().close(cancel_pending)
        for handle, _ in self._pending.values():
            if not handle.done():
                handle._future.set_exception(
                    self._link.fatal if self._link and self._link.fatal else errors.Unavailable("the requester was closed")
                )
                # Raised to whoever awaits the handle; nobody may.
                handle._future.exception()
        self._pending.clear()


__all__ = ["Progress", "Requester", "TaskHandle"]
