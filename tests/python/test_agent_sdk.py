"""The Python SDK (`clients/python`, `lattice_agents`) against a real `lattice serve`:
a worker process and a requester process run thousands of tasks while the server is
SIGKILLed and restarted, or while a proxy cuts their connections, and every task is
answered exactly once with each worker-side effect applied once; a cancel stops a
running handler; typed errors; bearer tokens; the README example runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_sdk_support import Proxy, Serve, free_port, read_json, spawn, wait_for
from conftest import ROOT

TASKS = 2000
CONCURRENCY = 64
RUN_TIMEOUT_S = 150


def _ledger(db) -> tuple[int, int, int]:
    con = sqlite3.connect(db)
    try:
        effects = con.execute("SELECT COUNT(*) FROM effects").fetchone()[0]
        total = con.execute("SELECT total FROM balance").fetchone()[0]
        runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    finally:
        con.close()
    return effects, total, runs


def _check_exactly_once(req_status: dict, db) -> None:
    assert req_status["done"], req_status
    assert req_status["failure_count"] == 0, req_status["failures"]
    assert req_status["wrong"] == [], req_status["wrong"]
    assert req_status["twice"] == [], req_status["twice"]
    assert req_status["distinct"] == TASKS and req_status["answered"] == TASKS, req_status
    assert req_status["stray_results"] == 0, req_status
    effects, total, runs = _ledger(db)
    assert effects == TASKS
    # Each effect applied once: the balance is the sum of every task's amount once.
    assert total == sum(i % 7 + 1 for i in range(TASKS)), (total, runs)
    assert runs >= TASKS


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_stubs_match_the_proto():
    r = subprocess.run(
        [sys.executable, "-m", "lattice_agents._generate", "--check"],
        cwd=ROOT / "clients" / "python", capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr


def test_sdk_type_checks():
    """The package ships py.typed: its annotations must hold."""
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", "/dev/null", "-p", "lattice_agents"],
        cwd=ROOT / "clients" / "python", capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_tasks_survive_sigkill_of_the_server(tmp_path):
    serve = Serve(tmp_path / "state")
    serve.start()
    db, wstat, rstat = tmp_path / "ledger.db", tmp_path / "worker.json", tmp_path / "requester.json"
    # The worker's first endpoint has nothing listening: it rotates to the next one.
    dead = f"http://127.0.0.1:{free_port()}"
    worker = spawn("ledger_worker.py", str(db), str(wstat), dead, serve.endpoint, log=tmp_path / "worker.log")
    requester = None
    try:
        wait_for(lambda: (read_json(wstat) or {}).get("established"), 30, "the worker's session", [worker])
        requester = spawn(
            "load_requester.py", str(TASKS), str(CONCURRENCY), str(rstat), serve.endpoint,
            log=tmp_path / "requester.log",
        )
        kills = drains = 0
        # Three SIGKILLs, and one graceful restart (SIGTERM: the server drains its agents).
        for at, how in ((300, "kill"), (800, "kill"), (1200, "term"), (1500, "kill")):
            wait_for(
                lambda: (read_json(rstat) or {}).get("answered", 0) >= at or (read_json(rstat) or {}).get("done"),
                RUN_TIMEOUT_S, f"{at} answers", [worker, requester],
            )
            if (read_json(rstat) or {}).get("done"):
                break
            if how == "kill":
                serve.kill()
                kills += 1
            else:
                serve.stop()
                drains += 1
            serve.start()
        wait_for(lambda: (read_json(rstat) or {}).get("done"), RUN_TIMEOUT_S, "all answers", [worker])
        requester.wait(timeout=30)
        assert requester.returncode == 0, (tmp_path / "requester.log").read_text()[-3000:]
        assert worker.poll() is None, "the worker process was never to be restarted"
        status = read_json(rstat)
        _check_exactly_once(status, db)
        assert (kills, drains) == (3, 1), f"the run finished before every restart ({kills} kills, {drains} drains)"
        wstatus = read_json(wstat)
        assert status["reconnects"] >= 4 and wstatus["reconnects"] >= 4, (status, wstatus)
        assert status["drains"] + wstatus["drains"] >= 1, "a graceful stop sends Drain to its agents"
        print(f"sigkill: {TASKS} tasks in {status['seconds']:.1f} s through {kills} kills, "
              f"ledger runs {_ledger(db)[2]}")
    finally:
        _stop(*(p for p in (requester, worker) if p is not None))
        serve.stop()


def test_tasks_survive_connections_cut_by_a_proxy(tmp_path):
    # Tasks of a worker cut off for 300 ms go to a worker again (here the same one,
    # once back): some run twice, and the ledger keyed on the task id applies once.
    # The proxy's outages last 600 ms.
    serve = Serve(tmp_path / "state", ["--reassign-after-ms", "300", "--max-attempts", "50"])
    serve.start()
    proxy = Proxy(serve.grpc_port)
    db, wstat, rstat = tmp_path / "ledger.db", tmp_path / "worker.json", tmp_path / "requester.json"
    worker = spawn("ledger_worker.py", str(db), str(wstat), proxy.endpoint, log=tmp_path / "worker.log")
    requester = None
    rng = random.Random(7)
    try:
        wait_for(lambda: (read_json(wstat) or {}).get("established"), 30, "the worker's session", [worker])
        requester = spawn(
            "load_requester.py", str(TASKS), str(CONCURRENCY), str(rstat), proxy.endpoint,
            log=tmp_path / "requester.log",
        )
        end = time.monotonic() + RUN_TIMEOUT_S
        while not (read_json(rstat) or {}).get("done"):
            assert time.monotonic() < end, f"not done in {RUN_TIMEOUT_S} s: {read_json(rstat)}"
            assert requester.poll() is None or (read_json(rstat) or {}).get("done"), (
                (tmp_path / "requester.log").read_text()[-3000:]
            )
            # Cut at random, only while tasks are moving (some answered, not all).
            time.sleep(rng.uniform(0.1, 0.5))
            if 0 < (read_json(rstat) or {}).get("answered", 0) < TASKS:
                # One cut in five is an outage longer than the reassignment delay.
                proxy.cut(outage=0.6 if rng.random() < 0.2 else 0.0)
        requester.wait(timeout=30)
        assert requester.returncode == 0, (tmp_path / "requester.log").read_text()[-3000:]
        assert worker.poll() is None
        status = read_json(rstat)
        _check_exactly_once(status, db)
        assert proxy.cuts >= 3, proxy.cuts
        # The outages made the orchestrator run some tasks again: the ledger's key is
        # what kept their effect single (checked above).
        assert _ledger(db)[2] > TASKS, "no task ran twice: the outages did not exercise reassignment"
        assert status["reconnects"] >= 1 and read_json(wstat)["reconnects"] >= 1
        print(f"proxy: {TASKS} tasks in {status['seconds']:.1f} s through {proxy.cuts} cuts, "
              f"ledger runs {_ledger(db)[2]}")
    finally:
        _stop(*(p for p in (requester, worker) if p is not None))
        proxy.close()
        serve.stop()


def test_cancel_stops_a_running_handler_within_100ms(tmp_path):
    from lattice_agents import Requester, errors

    serve = Serve(tmp_path / "state")
    serve.start()
    db, wstat = tmp_path / "ledger.db", tmp_path / "worker.json"
    worker = spawn("ledger_worker.py", str(db), str(wstat), serve.endpoint, log=tmp_path / "worker.log")
    try:
        wait_for(lambda: (read_json(wstat) or {}).get("established"), 30, "the worker's session", [worker])

        async def run() -> list[float]:
            async with Requester([serve.endpoint]) as r:
                ends = []
                for i in range(5):
                    handle = await r.offer("slow", {"i": i}, idempotency_key=f"slow-{i}", timeout=60)
                    end = time.monotonic() + 30
                    while f"slow-{i}" not in (read_json(wstat) or {}).get("started", []):
                        assert time.monotonic() < end and worker.poll() is None, "the handler did not start"
                        await asyncio.sleep(0.01)
                    t0 = time.monotonic()
                    await handle.cancel()
                    with pytest.raises(errors.Cancelled):
                        await asyncio.wait_for(handle.result(), 30)
                    ends.append(time.monotonic() - t0)
                return ends

        round_trips = asyncio.run(run())
        wait_for(lambda: len((read_json(wstat) or {}).get("cancel_latencies", [])) == 5, 10, "5 cancels")
        latencies = read_json(wstat)["cancel_latencies"]
        assert max(latencies) < 0.1, latencies
        print(f"cancel: handler stopped {sorted(latencies)[2] * 1e3:.2f} ms (median) after the cancel arrived; "
              f"requester cancel -> CANCELLED result {sorted(round_trips)[2] * 1e3:.1f} ms (median)")
    finally:
        _stop(worker)
        serve.stop()


def test_payloads_results_errors_and_progress(tmp_path):
    """Arbitrary payloads as offered, any JSON result, typed errors from statuses,
    progress, deadlines, tools through the gateway, and the built-in tool worker."""
    from lattice_agents import Requester, TaskContext, Worker, errors

    serve = Serve(tmp_path / "state")
    serve.start()
    builtin = subprocess.Popen(
        [str(serve_bin()), "agent", "--orchestrator", serve.endpoint, "--capability", "tools"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "agent.log", "wb"),
    )

    async def run() -> None:
        w = Worker([serve.endpoint])
        seen: list[bytes] = []

        @w.task("echo-raw", raw=True)
        async def echo_raw(ctx: TaskContext, payload: bytes) -> bytes:
            seen.append(payload)
            return payload[::-1]

        @w.task("trace")
        async def trace(ctx: TaskContext, args) -> str:
            return ctx.traceparent

        @w.task("json")
        async def as_json(ctx: TaskContext, args):
            await ctx.progress(0.5, "half way")
            if args == "boom":
                raise errors.FailedPrecondition("no boom today")
            if args == "crash":
                raise KeyError("missing")
            if args == "wait":
                await asyncio.sleep(30)
            if args == "huge":
                return "y" * (17 * 1024 * 1024)
            counted = await ctx.call_tool("counter", {"name": "sdk", "by": 1})
            return {"args": args, "task": ctx.task_id, "deadline": ctx.deadline is not None, "counter": counted}

        stop = asyncio.Event()
        serving = asyncio.ensure_future(w.serve(stop))
        async with Requester([serve.endpoint]) as r:
            raw = bytes(range(256)) * 3
            assert await r.submit("echo-raw", raw, raw=True) == raw[::-1]
            assert seen == [raw], "the payload reaches the worker byte for byte"
            handle = await r.offer("json", [1, {"a": None}, "ü"], timeout=30)
            out = await handle.result()
            assert handle.progress.get_nowait().note == "half way", "progress reaches the requester"
            assert out["args"] == [1, {"a": None}, "ü"] and out["task"] == handle.task_id and out["deadline"]
            assert handle.worker_id == w.link.session_id, "the result names the worker's session"
            assert out["counter"] == {"name": "sdk", "incremented_by": 1}
            # The same key again after the answer: the same task id, answered again.
            first = await r.submit("json", "x", idempotency_key="same-key", timeout=30)
            again = await r.submit("json", "x", idempotency_key="same-key", timeout=30)
            assert first["task"] == again["task"] == "same-key"
            with pytest.raises(errors.FailedPrecondition, match="no boom today"):
                await r.submit("json", "boom")
            # An unexpected exception answers UNKNOWN, which the orchestrator retries
            # on a worker, then dead-letters.
            with pytest.raises(errors.Aborted, match="dead-lettered after 3 attempts; last failure: KeyError"):
                await r.submit("json", "crash")
            with pytest.raises(errors.DeadlineExceeded):
                await r.submit("json", "wait", timeout=0.3)
            # The built-in worker is one worker among others: a tool task.
            assert (await r.submit("tools", {"tool": "calculator", "arguments": {"expression": "6*7"}}, timeout=30)) == {"value": 42.0}
            with pytest.raises(errors.NotFound):
                await r.submit("tools", {"tool": "teleport", "arguments": {}}, timeout=30)
            with pytest.raises(errors.InvalidArgument):
                await r.submit("tools", "not a tool task", timeout=30)
            # Frames over the orchestrator's message limit are refused before they are
            # queued (resent for ever otherwise); the session goes on.
            with pytest.raises(errors.OutOfRange, match="frame limit"):
                await r.submit("echo-raw", b"x" * (17 * 1024 * 1024), raw=True)
            with pytest.raises(errors.ResourceExhausted, match="result is too large"):
                await r.submit("json", "huge", timeout=30)
            assert await r.submit("echo-raw", b"ok", raw=True) == b"ko"
            # The requester's W3C trace reaches the worker (a child span of it).
            parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            child = await r.submit("trace", None, traceparent=parent)
            assert child.split("-")[1] == parent.split("-")[1] and child.split("-")[2] != parent.split("-")[2], child
            # Over REST: any JSON payload reaches the Python worker as offered.
            import requests

            resp = await asyncio.to_thread(
                requests.post, f"http://{serve.http}/v1/agents/tasks",
                json={"capability": "json", "payload": {"from": "rest", "list": [1, 2]}, "task_id": "rest-1"},
                timeout=30,
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["output"]["args"] == {"from": "rest", "list": [1, 2]}
            assert resp.json()["output"]["task"] == "rest-1"
            # Tools and memory straight from a requester.
            assert await r.call_tool("echo", {"value": {"x": 1}}) == {"value": {"x": 1}}
            put = await r.memory_put("notes", "a", b"hello", idempotency_key="put-a")
            got = await r.memory_get("notes", ["a"])
            assert got.blocks[0].value == b"hello" and got.version == put.version
        stop.set()
        await serving

    try:
        asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        builtin.terminate()
        builtin.wait(timeout=20)
        serve.stop()


def serve_bin():
    from conftest import LATTICE_BIN

    return LATTICE_BIN


def test_bearer_token_is_sent_and_a_bad_one_is_refused(tmp_path):
    from lattice_agents import Requester, SyncRequester, TaskContext, Worker, errors

    key = "lat_sdk_suite_agent_key_0123456789"
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[key]]\nsha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
        'tenant = "acme"\nuser = "sdk"\nscopes = ["agent"]\n'
    )
    serve = Serve(tmp_path / "state", ["--api-keys", str(keys)])
    serve.start()

    async def refused() -> None:
        r = Requester([serve.endpoint], tenant="acme", token="wrong")
        with pytest.raises(errors.Unauthenticated):
            await r.start(wait=20)
        await r.close()

    async def accepted(stop: asyncio.Event, ready: asyncio.Event) -> None:
        w = Worker([serve.endpoint], tenant="acme", token=key)

        @w.task("double")
        async def double(ctx: TaskContext, args: int) -> int:
            return args * 2

        await w.start(wait=20)
        ready.set()
        await w.serve(stop)

    try:
        asyncio.run(refused())
        import threading

        loop = asyncio.new_event_loop()
        stop, ready = asyncio.Event(), asyncio.Event()
        t = threading.Thread(target=lambda: loop.run_until_complete(accepted(stop, ready)), daemon=True)
        t.start()
        wait_for(ready.is_set, 30, "the worker with a token")
        # The blocking facade, with the same key.
        with SyncRequester([serve.endpoint], tenant="acme", token=key) as r:
            assert r.submit("double", 21, timeout=20) == 42
        loop.call_soon_threadsafe(stop.set)
        t.join(30)
    finally:
        serve.stop()


def test_readme_example_runs(tmp_path):
    """The example in clients/python/README.md, run as written against a server."""
    text = (ROOT / "clients" / "python" / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    serve = Serve(tmp_path / "state")
    serve.start()
    try:
        script = tmp_path / "example.py"
        script.write_text(code.replace("http://127.0.0.1:8001", serve.endpoint))
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "summary: 3 words" in r.stdout, r.stdout
    finally:
        serve.stop()


def test_deadline_holds_when_the_orchestrator_is_gone(tmp_path):
    """A requester whose orchestrator dies for good still answers by the deadline
    (plus a grace): for a task in flight, and for one it cannot even offer."""
    from lattice_agents import Requester, errors
    from lattice_agents.requester import DEADLINE_GRACE_S

    serve = Serve(tmp_path / "state")
    serve.start()
    db, wstat = tmp_path / "ledger.db", tmp_path / "worker.json"
    worker = spawn("ledger_worker.py", str(db), str(wstat), serve.endpoint, log=tmp_path / "worker.log")
    try:
        wait_for(lambda: (read_json(wstat) or {}).get("established"), 30, "the worker's session", [worker])

        async def run() -> None:
            async with Requester([serve.endpoint], max_backoff=0.5) as r:
                handle = await r.offer("slow", {}, idempotency_key="doomed", timeout=1.0)
                end = time.monotonic() + 30
                while "doomed" not in (read_json(wstat) or {}).get("started", []):
                    assert time.monotonic() < end, "the handler did not start"
                    await asyncio.sleep(0.01)
                serve.kill()
                t0 = time.monotonic()
                with pytest.raises(errors.DeadlineExceeded, match="out of reach"):
                    await handle.result()
                assert time.monotonic() - t0 < 1.0 + DEADLINE_GRACE_S + 5
                with pytest.raises(errors.DeadlineExceeded):
                    # Offered while no orchestrator is up: the window's credits are
                    # taken by nothing, the wait ends with the deadline.
                    for i in range(2000):
                        await r.offer("slow", {}, idempotency_key=f"never-{i}", timeout=0.5)

        asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        _stop(worker)
        serve.stop()


def test_worker_credits_bound_its_tasks_in_flight(tmp_path):
    """`max_in_flight` in Hello, and a `Credit` frame later, bound how many tasks the
    orchestrator assigns to the worker at once."""
    from lattice_agents import Requester, TaskContext, Worker

    serve = Serve(tmp_path / "state")
    serve.start()

    async def run() -> None:
        w = Worker([serve.endpoint], max_in_flight=2)
        state = {"now": 0, "max": 0, "limit": 2, "left": 8}
        changed = asyncio.Condition()

        @w.task("hold")
        async def hold(ctx: TaskContext, args) -> int:
            async with changed:
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
                changed.notify_all()
                # Hold until as many run as the limit allows (or as are left), bounded.
                try:
                    await asyncio.wait_for(
                        changed.wait_for(lambda: state["now"] >= min(state["limit"], state["left"])), 10
                    )
                except asyncio.TimeoutError:
                    pass
                state["now"] -= 1
                state["left"] -= 1
                changed.notify_all()
            return args

        stop = asyncio.Event()
        await w.start()
        serving = asyncio.ensure_future(w.serve(stop))
        async with Requester([serve.endpoint]) as r:
            assert sorted(await asyncio.gather(*(r.submit("hold", i, timeout=60) for i in range(8)))) == list(range(8))
            assert state["max"] == 2, state
            w.set_max_in_flight(4)
            state.update(max=0, limit=4, left=16)
            # The Credit frame goes out before any later frame of the worker's stream, and
            # the orchestrator handles a stream's frames in order: once a tool call made
            # after it is answered, the new credit is in force.
            assert await w.call_tool("echo", {"value": 1}) == {"value": 1}
            assert sorted(await asyncio.gather(*(r.submit("hold", i, timeout=60) for i in range(16)))) == list(range(16))
            assert state["max"] == 4, state
        stop.set()
        await serving

    try:
        asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        serve.stop()


def test_a_silent_connection_is_left_after_three_heartbeats(tmp_path):
    """A connection that stays open but delivers nothing (half-open) is noticed by
    the missing heartbeats; both agents reconnect and every task is answered once."""
    from lattice_agents import Requester, TaskContext, Worker

    serve = Serve(tmp_path / "state")  # heartbeats every 1 s
    serve.start()
    proxy = Proxy(serve.grpc_port)

    async def run() -> None:
        w = Worker([proxy.endpoint])

        @w.task("twice")
        async def twice(ctx: TaskContext, n: int) -> int:
            return 2 * n

        stop = asyncio.Event()
        await w.start()
        serving = asyncio.ensure_future(w.serve(stop))
        async with Requester([proxy.endpoint]) as r:
            assert await asyncio.gather(*(r.submit("twice", i) for i in range(50))) == [2 * i for i in range(50)]
            proxy.freeze()
            t0 = time.monotonic()
            late = await asyncio.wait_for(asyncio.gather(*(r.submit("twice", i) for i in range(50, 100))), 60)
            waited = time.monotonic() - t0
            assert late == [2 * i for i in range(50, 100)]
            assert r.link.reconnects >= 1 and w.link.reconnects >= 1
            assert r.stray_results == 0
            # Three missed intervals of 1 s, then a reconnect: not sooner, not much later.
            assert 2.0 <= waited < 30, waited
        stop.set()
        await serving

    try:
        asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        proxy.close()
        serve.stop()


def test_sync_facade_worker_run_and_sync_requester(tmp_path):
    """Blocking code: a worker process on `Worker.run()`, which leaves cleanly on
    SIGTERM, and `SyncRequester` in this process."""
    import signal

    from lattice_agents import SyncRequester

    serve = Serve(tmp_path / "state")
    serve.start()
    worker = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "agent_sdk" / "sync_worker.py"), serve.endpoint],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        with SyncRequester([serve.endpoint]) as r:
            assert [r.submit("inc", i, timeout=30) for i in range(5)] == [1, 2, 3, 4, 5]
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=30)
        assert worker.returncode == 0 and "run returned" in out, out
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        serve.stop()
