"""A requester process: submits N "ledger" tasks (ids task-0..task-N-1, n = i,
amount = i % 7 + 1) with a bounded concurrency, records every answer, and writes a
summary JSON (progress while running, `done: true` at the end).

usage: load_requester.py N CONCURRENCY STATUS_JSON ENDPOINT [ENDPOINT...]
"""

import asyncio
import collections
import json
import os
import sys
import time
from pathlib import Path

from lattice_agents import Requester, errors


def main() -> None:
    n, concurrency, status_path, *endpoints = sys.argv[1:]
    n, concurrency = int(n), int(concurrency)
    status = Path(status_path)
    answers: collections.Counter[str] = collections.Counter()
    wrong: list[str] = []
    failures: list[str] = []

    async def run() -> None:
        t0 = time.monotonic()
        async with Requester(endpoints, agent_id=f"load-requester-{os.getpid()}") as r:

            def publish(done: bool) -> None:
                tmp = status.with_suffix(".tmp")
                tmp.write_text(
                    json.dumps(
                        {
                            "pid": os.getpid(),
                            "answered": sum(answers.values()),
                            "distinct": len(answers),
                            "twice": [k for k, c in answers.items() if c != 1],
                            "wrong": wrong[:20],
                            "failures": failures[:20],
                            "failure_count": len(failures),
                            "stray_results": r.stray_results,
                            "reoffered": r.reoffered,
                            "reconnects": r.link.reconnects,
                            "drains": r.link.drains,
                            "seconds": time.monotonic() - t0,
                            "done": done,
                        }
                    )
                )
                tmp.replace(status)

            next_i = iter(range(n))

            async def lane() -> None:
                for i in next_i:
                    key = f"task-{i}"
                    try:
                        out = await r.submit("ledger", {"n": i, "amount": i % 7 + 1}, idempotency_key=key)
                    except errors.LatticeError as e:
                        failures.append(f"{key}: {e}")
                        continue
                    answers[key] += 1
                    if out.get("square") != i * i:
                        wrong.append(f"{key}: {out}")

            async def report() -> None:
                while True:
                    publish(False)
                    await asyncio.sleep(0.05)

            reporter = asyncio.ensure_future(report())
            await asyncio.gather(*(lane() for _ in range(concurrency)))
            reporter.cancel()
            publish(True)

    asyncio.run(run())


if __name__ == "__main__":
    main()
