"""MCP tool servers behind the tool gateway, end to end.

A private `lattice serve --mcp-config` lists three servers written with the `mcp`
package (tests/python/mcp_ledger_server.py): `ledger` (stdio child), `webledger`
(Streamable HTTP, a process this module runs) and `secret` (stdio, tenant `other`
only). A `lattice agent` worker runs the tasks offered on `POST /v1/agents/tasks`,
so every call takes the real path: REST -> orchestrator -> worker -> tool gateway ->
MCP server.
"""

import importlib.resources
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import pytest
import requests

import hostile_support as hs
from conftest import LATTICE_BIN, ROOT

PY = sys.executable
SERVER = str(Path(__file__).with_name("mcp_ledger_server.py"))


class HttpMcp:
    """The Streamable HTTP server process, restartable on the same port."""

    def __init__(self, tmp: Path):
        self.tmp, self.port, self.proc = tmp, 0, None
        self.ledger, self.events, self.die = tmp / "web-ledger.jsonl", tmp / "web-events", tmp / "web-die"

    def start(self):
        self.proc = subprocess.Popen(
            [PY, SERVER, "--transport", "http", "--port", str(self.port), "--ledger", str(self.ledger),
             "--events", str(self.events), "--die-flag", str(self.die)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        line = self.proc.stdout.readline().decode().strip()
        assert line.startswith("port="), line
        self.port = int(line.split("=", 1)[1])

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait(timeout=10)
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mcp")
    web = HttpMcp(tmp)
    web.start()
    files = {
        "ledger": (tmp / "ledger.jsonl", tmp / "events", tmp / "die", tmp / "ledger.pid"),
        "secret": (tmp / "secret.jsonl", tmp / "secret-events", tmp / "secret-die", tmp / "secret.pid"),
    }

    files["many"] = (tmp / "many.jsonl", tmp / "many-events", tmp / "many-die", tmp / "many.pid")

    def stdio(name, tenants=None, extra=(), timeout_ms=None):
        ledger, events, die, pid = files[name]
        args = [SERVER, "--ledger", str(ledger), "--events", str(events), "--die-flag", str(die), "--pid-file", str(pid),
                *extra]
        t = f"tenants = {json.dumps(tenants)}\n" if tenants else ""
        t += f"timeout_ms = {timeout_ms}\n" if timeout_ms else ""
        return f'[[server]]\nname = "{name}"\ncommand = "{PY}"\nargs = {json.dumps(args)}\n{t}'

    cfg = tmp / "mcp.toml"
    cfg.write_text(
        stdio("ledger", timeout_ms=3000)
        + f'\n[[server]]\nname = "webledger"\nurl = "http://127.0.0.1:{web.port}/mcp"\ntimeout_ms = 20000\n\n'
        + stdio("secret", ["other"])
        + "\n" + stdio("many", ["other"], ["--extra-tools", "300"])
    )
    # Ten attempts: a task whose tool server died is retried until the server is back.
    srv = hs.start_server(tmp / "serve", ["--mcp-config", str(cfg), "--max-attempts", "10"])
    log = tmp / "agent.log"
    with open(log, "wb") as f:
        worker = subprocess.Popen(
            [LATTICE_BIN, "agent", "--orchestrator", f"http://{srv.grpc}", "--capability", "tools"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f,
        )
    p = type("Plane", (), {})()
    p.srv, p.web, p.files, p.tmp, p.cfg = srv, web, files, tmp, cfg

    def tools_up():
        servers = {s["name"]: s for s in catalogue(srv, "other")["servers"]}
        return all(servers.get(n, {}).get("state") == "up" for n in ("ledger", "webledger", "secret"))

    hs.assert_eventually(tools_up, timeout=60, step=0.1, what="MCP servers connected")
    yield p
    worker.terminate()
    worker.wait(timeout=15)
    srv.stop()
    web.stop()
    assert "panicked" not in srv.log_text()


def catalogue(srv, tenant=None):
    headers = {"x-tenant-id": tenant} if tenant else {}
    r = requests.get(f"{srv.base_url}/v1/tools", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def offer(srv, tool, arguments, task_id=None, timeout_ms=60000, tenant=None):
    body = {"capability": "tools", "tool": tool, "arguments": arguments, "timeout_ms": timeout_ms,
            "task_id": task_id or f"t-{uuid.uuid4()}"}
    headers = {"x-tenant-id": tenant} if tenant else {}
    return requests.post(f"{srv.base_url}/v1/agents/tasks", json=body, headers=headers,
                         timeout=timeout_ms / 1000 + 10)


def tool_output(r):
    assert r.status_code == 200, r.text
    return json.loads(r.json()["output"]["content"][0]["text"])


def ledger_keys(path: Path):
    if not path.exists():
        return []
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


def test_catalogue_lists_mcp_tools_with_schemas_per_tenant(plane):
    cat = catalogue(plane.srv)
    tools = {t["name"]: t for t in cat["tools"]}
    for builtin in ("calculator", "counter", "echo", "http_fetch", "infer", "sleep"):
        assert tools[builtin]["source"] == "builtin"
    for name, source in (("ledger.append", "mcp:ledger"), ("webledger.append", "mcp:webledger")):
        t = tools[name]
        assert t["source"] == source
        assert t["input_schema"]["required"] == ["entry", "amount"]
        assert t["input_schema"]["properties"]["amount"]["maximum"] == 1000
    # `secret` is for tenant `other` only: not listed, and not callable, for `default`.
    assert not any(n.startswith("secret.") for n in tools)
    assert {s["name"] for s in cat["servers"]} == {"ledger", "webledger"}
    assert {s["name"] for s in catalogue(plane.srv, "other")["servers"]} == {"ledger", "webledger", "secret", "many"}
    other = catalogue(plane.srv, "other")
    assert "secret.append" in {t["name"] for t in other["tools"]}


def test_grpc_list_tools_matches_rest(plane, tmp_path):
    # Stubs from the repository's own proto, compiled now with grpcio-tools.
    from grpc_tools import protoc

    proto_root = ROOT / "crates" / "proto" / "proto"
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    # google.rpc.Status's module comes from googleapis-common-protos (grpcio's).
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", str(proto_root / "lattice/agent/v1/agent.proto")])
    assert rc == 0
    sys.path.insert(0, str(tmp_path))
    try:
        from lattice.agent.v1 import agent_pb2, agent_pb2_grpc
    finally:
        sys.path.remove(str(tmp_path))
    with grpc.insecure_channel(plane.srv.grpc) as ch:
        resp = agent_pb2_grpc.ToolCatalogStub(ch).ListTools(agent_pb2.ListToolsRequest(), timeout=10)
        other = agent_pb2_grpc.ToolCatalogStub(ch).ListTools(
            agent_pb2.ListToolsRequest(), metadata=[("x-tenant-id", "other")], timeout=10)
    rest = catalogue(plane.srv)
    assert [t.name for t in resp.tools] == [t["name"] for t in rest["tools"]]
    by_name = {t.name: t for t in resp.tools}
    assert json.loads(by_name["ledger.append"].input_schema_json) == {
        t["name"]: t for t in rest["tools"]}["ledger.append"]["input_schema"]
    assert {s.name: s.state for s in resp.servers} == {"ledger": "up", "webledger": "up"}
    assert "secret.append" in {t.name for t in other.tools}


@pytest.mark.parametrize("server", ["ledger", "webledger"])
def test_task_calls_mcp_tool_once_per_key(plane, server):
    ledger = plane.files["ledger"][0] if server == "ledger" else plane.web.ledger
    task_id = f"once-{server}-{uuid.uuid4()}"
    out = tool_output(offer(plane.srv, f"{server}.append", {"entry": "coffee", "amount": 3}, task_id))
    assert out == {"applied": True, "key": task_id}
    # The same task again: answered without a second effect.
    r = offer(plane.srv, f"{server}.append", {"entry": "coffee", "amount": 3}, task_id)
    assert r.status_code == 200, r.text
    assert ledger_keys(ledger).count(task_id) == 1


@pytest.mark.parametrize("args", [{"entry": "x", "amount": "lots"}, {"entry": "x", "amount": 0},
                                  {"entry": "x"}, {"entry": "", "amount": 1}])
def test_schema_the_server_declares_refuses_bad_arguments(plane, args):
    before = ledger_keys(plane.files["ledger"][0])
    r = offer(plane.srv, "ledger.append", args)
    assert r.status_code == 400, r.text
    assert "schema of 'ledger.append'" in r.text, r.text
    assert ledger_keys(plane.files["ledger"][0]) == before


def test_what_a_server_sends_is_bounded(plane):
    tools = {t["name"] for t in catalogue(plane.srv)["tools"]}
    # A schema over 64 KiB is not taken; the server's other tools are.
    assert "ledger.blob" in tools and "ledger.huge_schema" not in tools
    r = offer(plane.srv, "ledger.huge_schema", {"x": "a"})
    assert r.status_code == 404, r.text
    # A result over 1 MiB is refused, not relayed.
    r = offer(plane.srv, "ledger.blob", {"size": 2_000_000})
    assert r.status_code == 400, r.text
    assert "more than the 1048576 kept" in r.text, r.text
    assert len(tool_output_text(offer(plane.srv, "ledger.blob", {"size": 100_000}))) == 100_000
    # A message over 4 MiB is not read: the stdio line is dropped and the call ends at
    # the server's timeout (3 s); the connection stays and serves the next call.
    r = offer(plane.srv, "ledger.blob", {"size": 5_000_000})
    assert r.status_code == 504, r.text[:300]
    assert len(tool_output_text(offer(plane.srv, "ledger.blob", {"size": 10}))) == 10
    # A server that declares more than 256 tools is refused as a whole, and says why.
    def many_refused():
        many = {s["name"]: s for s in catalogue(plane.srv, "other")["servers"]}["many"]
        return many["state"] == "down" and "more than 256 tools" in many["error"]

    hs.assert_eventually(many_refused, timeout=60, step=0.1, what="the 300-tool server refused")
    assert not any(t["name"].startswith("many.") for t in catalogue(plane.srv, "other")["tools"])


def test_tool_list_changed_is_followed(plane):
    assert tool_output_text(offer(plane.srv, "ledger.grow", {})) == "ok"
    hs.assert_eventually(lambda: "ledger.grown" in {t["name"] for t in catalogue(plane.srv)["tools"]},
                         timeout=20, step=0.05, what="the new tool listed")
    assert tool_output_text(offer(plane.srv, "ledger.grown", {})) == "grown"


def tool_output_text(r):
    assert r.status_code == 200, r.text[:300]
    return r.json()["output"]["content"][0]["text"]


def test_tenant_cannot_call_another_tenants_server(plane):
    r = offer(plane.srv, "secret.append", {"entry": "x", "amount": 1})
    assert r.status_code == 404, r.text
    assert ledger_keys(plane.files["secret"][0]) == []


def test_a_task_calls_tools_as_its_requesters_tenant(plane):
    # The worker's own session is tenant `default`; the task's tenant `other` is
    # the one whose servers (and cache) apply to the calls made for it.
    task_id = f"other-{uuid.uuid4()}"
    r = offer(plane.srv, "secret.append", {"entry": "x", "amount": 1}, task_id, tenant="other")
    assert tool_output(r)["applied"] is True
    assert ledger_keys(plane.files["secret"][0]) == [task_id]


def test_cancelled_task_cancels_the_mcp_call(plane):
    events = plane.files["ledger"][1]
    task_id = f"cancel-{uuid.uuid4()}"
    # The REST request ends after 1 s; the task is cancelled and the gateway's call
    # with it, which the server sees as notifications/cancelled.
    r = offer(plane.srv, "ledger.wait", {"ms": 120000}, task_id, timeout_ms=1000)
    assert r.status_code == 504, r.text

    def cancelled():
        lines = events.read_text().splitlines() if events.exists() else []
        return f"started {task_id}" in lines and f"cancelled {task_id}" in lines

    hs.assert_eventually(cancelled, timeout=20, step=0.05, what="the MCP server saw the cancellation")


def test_server_timeout_bounds_the_call_and_cancels_it(plane):
    events = plane.files["ledger"][1]
    task_id = f"slow-{uuid.uuid4()}"
    # `ledger` is configured with timeout_ms = 3000; the task would allow 60 s.
    r = offer(plane.srv, "ledger.wait", {"ms": 120000}, task_id, timeout_ms=60000)
    assert r.status_code == 504, r.text
    assert "did not finish within 3s" in r.text, r.text
    hs.assert_eventually(lambda: f"cancelled {task_id}" in events.read_text().splitlines(), timeout=20, step=0.05,
                         what="the MCP server saw the timeout's cancellation")


def _unavailable_count(srv, tool):
    text = hs.scrape(srv.metrics)
    want = f'lattice_tool_calls_total{{tool="{tool}",outcome="unavailable"}}'
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(want))


@pytest.mark.parametrize("server", ["ledger", "webledger"])
def test_server_dying_mid_call_gives_retryable_failures_then_recovery_without_duplicate(plane, server):
    if server == "ledger":
        ledger, die = plane.files["ledger"][0], plane.files["ledger"][2]
    else:
        ledger, die = plane.web.ledger, plane.web.die
    before = _unavailable_count(plane.srv, f"{server}.append")
    connects = {s["name"]: s["connects"] for s in catalogue(plane.srv)["servers"]}[server]
    # The server writes the entry, then dies before answering.
    die.write_text("1")
    task_id = f"die-{server}-{uuid.uuid4()}"
    result = {}
    t = threading.Thread(target=lambda: result.update(r=offer(plane.srv, f"{server}.append",
                                                              {"entry": "rent", "amount": 7}, task_id, 90000)))
    t.start()
    hs.assert_eventually(lambda: not die.exists(), timeout=30, step=0.05, what="the server took the call")
    # The in-flight call and the retries that follow fail as UNAVAILABLE (retryable).
    hs.assert_eventually(lambda: _unavailable_count(plane.srv, f"{server}.append") > before,
                         timeout=30, step=0.05, what="retryable failures")
    if server == "webledger":
        # An HTTP server is someone else's process: it comes back on its own port.
        plane.web.proc.wait(timeout=10)
        plane.web.stop()
        plane.web.start()
    t.join(timeout=120)
    assert not t.is_alive()
    r = result["r"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["attempts"] >= 2, body
    # The retry reached the restarted server with the same key: no second effect.
    assert json.loads(body["output"]["content"][0]["text"]) == {"applied": False, "key": task_id}
    assert ledger_keys(ledger).count(task_id) == 1
    status = {s["name"]: s for s in catalogue(plane.srv)["servers"]}[server]
    assert status["state"] == "up" and status["connects"] > connects
    # And new tasks run as before.
    assert tool_output(offer(plane.srv, f"{server}.append", {"entry": "after", "amount": 1}))["applied"] is True


def test_stdio_server_killed_is_respawned(plane):
    pid = int(plane.files["ledger"][3].read_text())
    os.kill(pid, signal.SIGKILL)
    hs.assert_eventually(lambda: plane.files["ledger"][3].read_text() != str(pid), timeout=30, step=0.05,
                         what="a new ledger server process")
    hs.assert_eventually(
        lambda: {s["name"]: s["state"] for s in catalogue(plane.srv)["servers"]}["ledger"] == "up",
        timeout=30, step=0.05, what="ledger up again")
    assert tool_output(offer(plane.srv, "ledger.append", {"entry": "respawned", "amount": 2}))["applied"] is True


def test_config_reload_adds_and_removes_servers(plane):
    original = plane.cfg.read_text()
    ledger, events, die, pid = plane.files["ledger"]
    extra = (f'\n[[server]]\nname = "late"\ncommand = "{PY}"\n'
             f'args = {json.dumps([SERVER, "--ledger", str(plane.tmp / "late.jsonl"), "--events", str(events)])}\n')
    plane.cfg.write_text(original + extra)
    try:
        hs.assert_eventually(lambda: "late.append" in {t["name"] for t in catalogue(plane.srv)["tools"]},
                             timeout=30, step=0.1, what="the added server's tools")
        # A bad edit keeps the running servers.
        plane.cfg.write_text("[[server]]\nname = \"BAD\"\n")
        hs.assert_eventually(lambda: "MCP configuration does not parse" in plane.srv.log_text(),
                             timeout=30, step=0.1, what="the bad edit noticed")
        assert "late.append" in {t["name"] for t in catalogue(plane.srv)["tools"]}
    finally:
        plane.cfg.write_text(original)
    hs.assert_eventually(lambda: "late.append" not in {t["name"] for t in catalogue(plane.srv)["tools"]},
                         timeout=30, step=0.1, what="the removed server's tools gone")
