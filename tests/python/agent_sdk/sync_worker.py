"""A worker served from sync code with `Worker.run()` (until SIGTERM).

usage: sync_worker.py ENDPOINT
"""

import sys

from lattice_agents import TaskContext, Worker

worker = Worker(sys.argv[1:])


@worker.task("inc")
async def inc(ctx: TaskContext, n: int) -> int:
    return n + 1


worker.run()
print("run returned", flush=True)
