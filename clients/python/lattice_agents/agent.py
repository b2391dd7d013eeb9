"""What every agent can do, worker or requester: call tools and memory through the
orchestrator's gateway over its own session, and open and close that session."""

from __future__ import annotations

import asyncio
import enum
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import errors
from ._proto import agent_pb2 as pb
from .link import Link, LinkConfig, child_traceparent, new_traceparent
from .session import now_us


class Priority(enum.IntEnum):
    BACKGROUND = 0
    LOW = 1
    NORMAL = 2
    HIGH = 3
    URGENT = 4
    REALTIME = 5


@dataclass(frozen=True)
class MemoryBlock:
    block_id: str
    value: bytes
    version: int


@dataclass(frozen=True)
class MemoryResult:
    """A memory op's answer: the namespace version after it, and the blocks read
    (get, snapshot) or the writes since a version (delta sync)."""

    memory_ref: str
    version: int
    blocks: list[MemoryBlock]
    snapshot: bool


def deadline_us_of(deadline: float | None, timeout: float | None) -> int:
    """The wire deadline (absolute µs) from an absolute epoch-seconds deadline or a
    relative timeout in seconds; the earlier wins, 0 for none."""
    cands = []
    if deadline is not None:
        cands.append(int(deadline * 1e6))
    if timeout is not None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        cands.append(now_us() + int(timeout * 1e6))
    return min(cands) if cands else 0


class Agent:
    """The session and the calls any agent may make. Use as an async context manager,
    or `await start()` / `await close()`."""

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        capabilities: Sequence[str] = (),
        agent_id: str | None = None,
        tenant: str = "default",
        token: str | None = None,
        max_in_flight: int = 16,
        metadata: Sequence[tuple[str, str]] = (),
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        cfg = LinkConfig(
            endpoints=[endpoints] if isinstance(endpoints, str) else list(endpoints),
            tenant=tenant,
            capabilities=list(capabilities),
            max_in_flight=max_in_flight,
            token=token,
            metadata=list(metadata),
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
        )
        if agent_id:
            cfg.agent_id = agent_id
        self._cfg = cfg
        self._link: Link | None = None
        self._tool_calls: dict[str, asyncio.Future[pb.ToolResult]] = {}
        self._memory_ops: dict[str, asyncio.Future[pb.MemoryResult]] = {}

    @property
    def link(self) -> Link:
        if self._link is None:
            raise RuntimeError("the agent is not started: use `async with` or `await start()`")
        return self._link

    @property
    def agent_id(self) -> str:
        return self._cfg.agent_id

    async def start(self, wait: float | None = 30.0) -> None:
        """Opens the session; waits up to `wait` seconds for the first handshake
        (None: return at once, the link keeps trying in the background)."""
        if self._link is None:
            self._link = Link(self._cfg, self._dispatch, self._lost)
            self._link.start()
        if wait is not None:
            await self._link.established(wait)

    async def close(self, cancel_pending: bool = False) -> None:
        if self._link is not None:
            await self._link.close(cancel_pending)
        self._fail_calls(errors.Unavailable("the agent was closed"))

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- frames --------------------------------------------------------------------

    def _dispatch(self, frame: pb.AgentResponse) -> None:
        kind = frame.WhichOneof("body")
        if kind == "tool_result":
            fut = self._tool_calls.pop(frame.tool_result.call_id, None)
            if fut is not None and not fut.done():
                fut.set_result(frame.tool_result)
        elif kind == "memory":
            fut_m = self._memory_ops.pop(frame.env.correlation_id, None)
            if fut_m is not None and not fut_m.done():
                fut_m.set_result(frame.memory)
        else:
            self._on_frame(kind, frame)

    def _on_frame(self, kind: str | None, frame: pb.AgentResponse) -> None:
        """Frames for the role (assign, cancel, result, progress)."""

    def _lost(self, task_id: str) -> None:
        """An accepted offer whose session is gone."""

    def _fail_calls(self, err: errors.LatticeError) -> None:
        for futs in (self._tool_calls, self._memory_ops):
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(err)
            futs.clear()

    # --- tools and memory through the gateway ------------------------------------

    async def call_tool(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        deadline_us: int = 0,
        task_id: str = "",
        traceparent: str | None = None,
        priority: int = Priority.NORMAL,
    ) -> Any:
        """Runs a gateway tool; returns its JSON output or raises the typed error.
        The idempotency key (default: a new one) makes a repeated call answer from
        the gateway's cache instead of running the tool again."""
        call_id = os.urandom(12).hex()
        timeout_ms = 0 if timeout is None else max(1, min(int(timeout * 1000), 2**32 - 1))
        fut: asyncio.Future[pb.ToolResult] = asyncio.get_running_loop().create_future()
        self._tool_calls[call_id] = fut
        try:
            await self.link.send(
                "tool_call",
                pb.ToolCall(
                    call_id=call_id,
                    tool=tool,
                    arguments_json=json.dumps(arguments or {}),
                    timeout_ms=timeout_ms,
                ),
                priority=int(priority),
                deadline_us=deadline_us,
                idempotency_key=idempotency_key or call_id,
                correlation_id=task_id,
                traceparent=traceparent or new_traceparent(),
            )
            result = await fut
        finally:
            self._tool_calls.pop(call_id, None)
        err = errors.from_status(result.status if result.HasField("status") else None, task_id=task_id or None)
        if err is not None:
            raise err
        return json.loads(result.output_json) if result.output_json else None

    async def _memory(self, op: pb.MemoryOp, idempotency_key: str, traceparent: str | None) -> MemoryResult:
        if not op.memory_ref:
            raise ValueError("memory_ref is required")
        # Memory answers are matched by the correlation id the orchestrator echoes.
        op_id = os.urandom(12).hex()
        fut: asyncio.Future[pb.MemoryResult] = asyncio.get_running_loop().create_future()
        self._memory_ops[op_id] = fut
        try:
            await self.link.send(
                "memory_op",
                op,
                idempotency_key=idempotency_key or op_id,
                correlation_id=op_id,
                traceparent=traceparent or new_traceparent(),
            )
            r = await fut
        finally:
            self._memory_ops.pop(op_id, None)
        err = errors.from_status(r.status if r.HasField("status") else None)
        if err is not None:
            raise err
        return MemoryResult(
            memory_ref=r.memory_ref,
            version=r.version,
            blocks=[MemoryBlock(b.block_id, b.value, b.version) for b in r.blocks],
            snapshot=r.snapshot,
        )

    async def memory_get(self, memory_ref: str, block_ids: Sequence[str], *, traceparent: str | None = None) -> MemoryResult:
        return await self._memory(pb.MemoryOp(memory_ref=memory_ref, get=pb.MemoryGet(block_ids=list(block_ids))), "", traceparent)

    async def memory_put(
        self,
        memory_ref: str,
        block_id: str,
        value: bytes,
        *,
        expected_version: int = 0,
        idempotency_key: str = "",
        traceparent: str | None = None,
    ) -> MemoryResult:
        """Writes a block; a namespace newer than `expected_version` (when non-zero)
        raises `Aborted`. The idempotency key makes a repeated write happen once."""
        op = pb.MemoryOp(
            memory_ref=memory_ref,
            put=pb.MemoryPut(block_id=block_id, value=value, expected_version=expected_version),
        )
        return await self._memory(op, idempotency_key, traceparent)

    async def memory_sync(self, memory_ref: str, since_version: int = 0, *, traceparent: str | None = None) -> MemoryResult:
        op = pb.MemoryOp(memory_ref=memory_ref, sync=pb.MemorySync(since_version=since_version))
        return await self._memory(op, "", traceparent)


__all__ = ["Agent", "MemoryBlock", "MemoryResult", "Priority", "child_traceparent", "deadline_us_of", "new_traceparent"]
