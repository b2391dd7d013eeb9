"""A REST task retried with its task_id after `lattice serve` was killed answers from
what the server already holds: a finished task's stored result at once, a queued or
running one when it finishes. It neither runs again nor waits for the lost REST
session to expire (which took the session idle timeout, 300 s, before).
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import uuid

import requests

from agent_sdk_support import Serve, wait_for
from conftest import LATTICE_BIN, ROOT

TASKS = 40
# Long enough that most tasks are queued or running when the server is killed; the
# retry's timeout is the bound a task lost by the server would hit.
SLEEP_MS = 300
RETRY_TIMEOUT_MS = 60_000


def offer(http: str, task_id: str, timeout_ms: int):
    body = {
        "capability": "tools",
        "tool": "sleep",
        "arguments": {"ms": SLEEP_MS},
        "task_id": task_id,
        "timeout_ms": timeout_ms,
    }
    return requests.post(f"http://{http}/v1/agents/tasks", json=body, timeout=timeout_ms / 1000 + 15)


def test_a_retry_after_a_crash_gets_the_held_task(tmp_path):
    serve = Serve(tmp_path / "state")
    serve.start()
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [LATTICE_BIN, "agent", "--orchestrator", serve.endpoint, "--capability", "tools", "--max-in-flight", "4"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
    )
    run = uuid.uuid4().hex[:8]
    ids = [f"retry-{run}-{i}" for i in range(TASKS)]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=TASKS)
    try:
        first = {i: pool.submit(offer, serve.http, i, 60_000) for i in ids}
        wait_for(lambda: sum(f.done() for f in first.values()) >= 8, 120, "the first answers", [worker])
        serve.kill()
        serve.start()  # same gRPC port: the worker reconnects; a new REST port

        def first_answer(task_id):
            try:
                r = first[task_id].result()
            except requests.RequestException:
                return None
            return r if r.status_code == 200 else None

        lost = [i for i in ids if first_answer(i) is None]
        assert lost, "the kill came after every task had answered"
        retries = {i: pool.submit(offer, serve.http, i, RETRY_TIMEOUT_MS) for i in lost}
        for task_id, f in retries.items():
            r = f.result()
            # Before, a task the server held answered 504 here: the new session's
            # offer of its id was dropped and nothing came back.
            assert r.status_code == 200, (task_id, r.status_code, r.text)
            body = r.json()
            assert body["task_id"] == task_id
            assert body["output"] == {"slept_ms": SLEEP_MS}, body
        assert worker.poll() is None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        worker.terminate()
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
        serve.stop()
