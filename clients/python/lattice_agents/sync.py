"""Blocking facade for code without an event loop: `SyncRequester` runs a
`Requester` on an event loop in one background thread it owns. (The asyncio API
starts no threads; a worker from sync code is `Worker.run()`.)"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from .agent import MemoryResult
from .requester import Requester

T = TypeVar("T")


class SyncRequester:
    """`with SyncRequester(endpoints) as r: r.submit("summarise", {...})`."""

    def __init__(self, endpoints: Sequence[str] | str, **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lattice-agents", daemon=True)
        self._thread.start()
        self._requester: Requester = self._run(self._make(endpoints, kw))

    async def _make(self, endpoints: Sequence[str] | str, kw: dict[str, Any]) -> Requester:
        return Requester(endpoints, **kw)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except (KeyboardInterrupt, concurrent.futures.TimeoutError):
            fut.cancel()
            raise

    @property
    def requester(self) -> Requester:
        return self._requester

    def start(self, wait: float | None = 30.0) -> None:
        self._run(self._requester.start(wait))

    def submit(self, capability: str, payload: Any = None, *, wait: float | None = None, **kw: Any) -> Any:
        """Blocks until the task's result (or its typed error). `wait` bounds the
        local wait; when it passes the task is cancelled and TimeoutError raised."""
        return self._run(self._requester.submit(capability, payload, **kw), wait)

    def cancel(self, task_id: str, reason: str = "cancelled by the requester") -> None:
        self._run(self._requester.cancel(task_id, reason))

    def call_tool(self, tool: str, arguments: dict[str, Any] | None = None, **kw: Any) -> Any:
        return self._run(self._requester.call_tool(tool, arguments, **kw))

    def memory_get(self, memory_ref: str, block_ids: Sequence[str]) -> MemoryResult:
        return self._run(self._requester.memory_get(memory_ref, block_ids))

    def memory_put(self, memory_ref: str, block_id: str, value: bytes, **kw: Any) -> MemoryResult:
        return self._run(self._requester.memory_put(memory_ref, block_id, value, **kw))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._requester.close(), 10.0)
            self._run(_cancel_leftovers(), 10.0)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
            self._loop.close()

    def __enter__(self) -> SyncRequester:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _cancel_leftovers() -> None:
    """Ends what is still scheduled on the facade's loop (gRPC's own bookkeeping
    tasks) before the loop stops, so none is destroyed while pending."""
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me]
    for t in left:
        t.cancel()
    await asyncio.gather(*left, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()
