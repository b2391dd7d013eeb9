"""The reliability layer both ends of an agent stream share, as in the orchestrator:
the receiver's dedupe state (`Inbox`) and the sender's unacknowledged frames (`Outbox`).

The transport (one HTTP/2 stream) keeps order, so within one connection seq numbers
arrive in order; across a reconnect the sender resends from the peer's last processed
seq + 1. A frame at or below the high-water mark is therefore a duplicate. The msg_id
window catches a frame resent under a new seq (after a GAP renumbering).
"""

from __future__ import annotations

import enum
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

# Frames sent more than this far in the future are refused (broken clock or forgery).
MAX_SKEW_US = 30_000_000


def now_us() -> int:
    """Microseconds since the Unix epoch, the unit of every timestamp on the wire."""
    return time.time_ns() // 1000


_MSG_PREFIX = os.urandom(8).hex()
_MSG_COUNTER = itertools.count()


def new_msg_id() -> str:
    """A frame's msg_id: a random per-process prefix and a counter (no RNG per frame)."""
    return f"{_MSG_PREFIX}-{next(_MSG_COUNTER):x}"


class Verdict(enum.Enum):
    NEW = "new"  # process it, then acknowledge
    DUPLICATE = "duplicate"  # already processed: acknowledge again, do not process
    SKEWED = "skewed"  # sent too far in the future
    GAP = "gap"  # frames missing in between: the stream is reset


class Inbox:
    """Receiver side: the highest contiguous seq processed, plus a bounded msg_id window."""

    def __init__(self, hwm: int = 0, window_s: float = 600.0, max_ids: int = 65_536) -> None:
        self.hwm = hwm
        self._ids: set[str] = set()
        self._order: deque[tuple[int, str]] = deque()
        self._window_us = int(window_s * 1e6)
        self._max_ids = max_ids

    def check(self, seq: int, msg_id: str, sent_at_us: int) -> Verdict:
        now = now_us()
        if seq <= self.hwm:
            return Verdict.DUPLICATE
        if sent_at_us > now + MAX_SKEW_US:
            return Verdict.SKEWED
        # A frame at hwm + 1 is new by construction, however old its sent_at; the
        # msg_id window only catches a frame resent under a new seq after a GAP.
        if msg_id and msg_id in self._ids:
            self.hwm = seq
            return Verdict.DUPLICATE
        if seq != self.hwm + 1:
            return Verdict.GAP
        self.hwm = seq
        if msg_id:
            self._remember(now, msg_id)
        return Verdict.NEW

    def _remember(self, now: int, msg_id: str) -> None:
        while self._order and (len(self._order) >= self._max_ids or self._order[0][0] < now - self._window_us):
            _, old = self._order.popleft()
            self._ids.discard(old)
        self._ids.add(msg_id)
        self._order.append((now, msg_id))

    def __len__(self) -> int:
        return len(self._ids)


class Outbox(Generic[T]):
    """Sender side: frames kept, in seq order, until the peer's cumulative ack covers them."""

    def __init__(self, next_seq: int = 1) -> None:
        self.next_seq = max(next_seq, 1)
        self._unacked: deque[tuple[int, T]] = deque()

    def push(self, make: Callable[[int], T]) -> tuple[int, T]:
        seq = self.next_seq
        self.next_seq += 1
        frame = make(seq)
        self._unacked.append((seq, frame))
        return seq, frame

    def ack(self, ack: int) -> list[tuple[int, T]]:
        """Drops every frame up to `ack` and returns them."""
        dropped = []
        while self._unacked and self._unacked[0][0] <= ack:
            dropped.append(self._unacked.popleft())
        return dropped

    def after(self, seq: int) -> Iterator[tuple[int, T]]:
        """Unacknowledged frames after `seq`, in order. Seqs in the outbox are
        contiguous, so the first one wanted is found by arithmetic, not a scan."""
        if not self._unacked:
            return iter(())
        start = max(0, seq - self._unacked[0][0] + 1)
        return itertools.islice(self._unacked, start, None)

    def pending(self) -> Iterator[tuple[int, T]]:
        return iter(self._unacked)

    def renumber(self, apply: Callable[[T, int], None]) -> None:
        """After a GAP the peer knows none of our seqs: renumber from 1, keeping order."""
        renumbered: deque[tuple[int, T]] = deque()
        for seq, (_, frame) in enumerate(self._unacked, start=1):
            apply(frame, seq)
            renumbered.append((seq, frame))
        self._unacked = renumbered
        self.next_seq = len(renumbered) + 1

    def __len__(self) -> int:
        return len(self._unacked)
