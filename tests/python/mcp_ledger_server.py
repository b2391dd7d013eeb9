"""A real MCP server, written with the `mcp` package, for the tool-gateway tests.

Tools:
- `append(entry, amount)`: appends one JSON line to the ledger file, keyed by the
  idempotency key the gateway passes in `_meta["io.lattice/idempotency_key"]`; a key
  already in the ledger is not appended again (the effect happens once per key).
- `wait(ms)`: sleeps; writes `started <key>` and, if the call is cancelled,
  `cancelled <key>` to the events file.
- `blob(size)`: returns a text of `size` bytes.
- `huge_schema(x)`: a tool whose declared schema is over 64 KiB.
- `grow()`: adds a tool `grown` and sends `notifications/tools/list_changed`.

`--extra-tools N`: also declares N trivial tools (`t0`, `t1`, ...).

`--die-flag PATH`: when PATH exists, `append` deletes it, writes its line, and the
process exits before answering: a server that dies with a call in flight after its
effect.

Transports: `--transport stdio`, or `--transport http --port N` (Streamable HTTP on
127.0.0.1:N/mcp; N=0 picks a port, printed as `port=N` on stdout).
"""

import argparse
import asyncio
import fcntl
import json
import os
import socket
import sys
from typing import Annotated

import anyio
from pydantic import Field

from mcp.server.mcpserver import Context, MCPServer

KEY = "io.lattice/idempotency_key"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ledger", required=True)
    p.add_argument("--events", required=True)
    p.add_argument("--die-flag", default="")
    p.add_argument("--pid-file", default="")
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--extra-tools", type=int, default=0)
    a = p.parse_args()
    if a.pid_file:
        with open(a.pid_file, "w") as f:
            f.write(str(os.getpid()))

    server = MCPServer("ledger")

    def key_of(ctx: Context) -> str:
        meta = ctx.request_context.meta or {}
        return str(meta.get(KEY, ""))

    def event(line: str) -> None:
        with open(a.events, "a") as f:
            f.write(line + "\n")

    @server.tool(description="Appends an entry to the ledger, once per idempotency key")
    def append(
        entry: Annotated[str, Field(min_length=1, max_length=64)],
        amount: Annotated[int, Field(ge=1, le=1000)],
        ctx: Context,
    ) -> dict:
        key = key_of(ctx)
        with open(a.ledger, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            for line in f:
                if key and json.loads(line)["key"] == key:
                    return {"applied": False, "key": key}
            f.write(json.dumps({"key": key, "entry": entry, "amount": amount, "pid": os.getpid()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if a.die_flag and os.path.exists(a.die_flag):
            os.unlink(a.die_flag)
            os._exit(3)
        return {"applied": True, "key": key}

    @server.tool(description="Sleeps for ms milliseconds; records cancellation")
    async def wait(ms: Annotated[int, Field(ge=0, le=600000)], ctx: Context) -> dict:
        key = key_of(ctx)
        event(f"started {key}")
        try:
            await anyio.sleep(ms / 1000)
        except BaseException:
            event(f"cancelled {key}")
            raise
        return {"slept_ms": ms}

    @server.tool(description="Returns size bytes of text")
    def blob(size: Annotated[int, Field(ge=0, le=16_000_000)]) -> str:
        return "x" * size

    @server.tool(description="A tool whose schema is too large to accept")
    def huge_schema(x: Annotated[str, Field(description="y" * 70_000)]) -> str:
        return x

    @server.tool(description="Adds the tool `grown` and says the tool list changed")
    async def grow(ctx: Context) -> str:
        server.add_tool(lambda: "grown", name="grown", description="added at run time")
        await ctx.session.send_tool_list_changed()
        return "ok"

    for i in range(a.extra_tools):
        server.add_tool(lambda: "ok", name=f"t{i}", description="trivial")

    if a.transport == "stdio":
        server.run("stdio")
        return

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", a.port))
    sock.listen(64)
    print(f"port={sock.getsockname()[1]}", flush=True)
    app = server.streamable_http_app(host="127.0.0.1")
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    asyncio.run(uv.serve(sockets=[sock]))


if __name__ == "__main__":
    sys.exit(main())
