"""Python SDK for Lattice's agent plane (`lattice.agent.v1.AgentCoordination`).

Workers register async handlers per capability; requesters submit tasks and await
their results. Both hold one resumable session to the orchestrator: acknowledged,
deduplicated, resent after a reconnect, so a task is answered once however often the
connection or the orchestrator goes away.
"""

from . import errors
from .agent import Agent, MemoryBlock, MemoryResult, Priority
from .errors import LatticeError
from .link import LinkConfig, LinkState
from .requester import Progress, Requester, TaskHandle
from .sync import SyncRequester
from .worker import TaskContext, Worker

__all__ = [
    "Agent",
    "LatticeError",
    "LinkConfig",
    "LinkState",
    "MemoryBlock",
    "MemoryResult",
    "Priority",
    "Progress",
    "Requester",
    "SyncRequester",
    "TaskContext",
    "TaskHandle",
    "Worker",
    "errors",
]
