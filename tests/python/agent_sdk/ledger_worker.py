"""A worker process: capability "ledger" applies a credit to a SQLite ledger keyed on
the task's idempotency key (so a task run twice credits once) and answers the square
of `n`; capability "slow" waits until cancelled and records, in `cancel_log`, how
long after the cancel frame arrived the handler stopped.

usage: ledger_worker.py LEDGER_DB STATUS_JSON ENDPOINT [ENDPOINT...]
"""

import asyncio
import json
import os
import random
import sqlite3
import sys
import time
from pathlib import Path

from lattice_agents import TaskContext, Worker


def main() -> None:
    db_path, status_path, *endpoints = sys.argv[1:]
    status = Path(status_path)
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, amount INTEGER NOT NULL)")
    db.execute("CREATE TABLE IF NOT EXISTS balance (id INTEGER PRIMARY KEY CHECK (id = 1), total INTEGER NOT NULL)")
    db.execute("INSERT OR IGNORE INTO balance VALUES (1, 0)")
    db.execute("CREATE TABLE IF NOT EXISTS runs (key TEXT NOT NULL, attempt INTEGER NOT NULL)")
    cancels: list[float] = []
    started: list[str] = []

    worker = Worker(endpoints, max_in_flight=32, agent_id=f"ledger-worker-{os.getpid()}")

    @worker.task("ledger")
    async def ledger(ctx: TaskContext, args: dict) -> dict:
        # Some tasks are in flight whenever the orchestrator dies or the link is cut.
        await asyncio.sleep(random.uniform(0, 0.004))
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO runs VALUES (?, ?)", (ctx.idempotency_key, ctx.attempt))
        applied = db.execute(
            "INSERT OR IGNORE INTO effects VALUES (?, ?)", (ctx.idempotency_key, args["amount"])
        ).rowcount
        if applied:
            db.execute("UPDATE balance SET total = total + ? WHERE id = 1", (args["amount"],))
        db.execute("COMMIT")
        return {"n": args["n"], "square": args["n"] * args["n"], "pid": os.getpid()}

    @worker.task("slow")
    async def slow(ctx: TaskContext, args: dict) -> dict:
        started.append(ctx.task_id)
        publish()
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            assert ctx.cancel_received_at is not None and ctx.cancelled.is_set()
            cancels.append(time.monotonic() - ctx.cancel_received_at)
            publish()
            raise
        return {"slept": True}

    def publish() -> None:
        link = worker._link
        tmp = status.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "completed": worker.completed,
                    "reconnects": link.reconnects if link else 0,
                    "drains": link.drains if link else 0,
                    "established": bool(link and link.session_id),
                    "started": started,
                    "cancel_latencies": cancels,
                }
            )
        )
        tmp.replace(status)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        loop.add_signal_handler(signal.SIGTERM, stop.set)

        async def report() -> None:
            while True:
                publish()
                await asyncio.sleep(0.1)

        reporter = asyncio.ensure_future(report())
        try:
            await worker.serve(stop)
        finally:
            reporter.cancel()
            publish()

    asyncio.run(run())


if __name__ == "__main__":
    main()
