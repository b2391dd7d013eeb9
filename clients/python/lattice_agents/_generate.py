"""Regenerates the protobuf and gRPC stubs in `lattice_agents/_proto` from the
repository's `crates/proto/proto/lattice/agent/v1/agent.proto`.

`python -m lattice_agents._generate` rewrites them; `--check` only compares and exits
non-zero if the checked-in stubs no longer match the proto (the test suite runs it).
`google.rpc.Status` comes from `googleapis-common-protos`, the package every Python
gRPC stack shares, so it is not generated here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
OUT = PACKAGE / "_proto"
PROTO_ROOT = PACKAGE.parents[2] / "crates" / "proto" / "proto"
PROTO = "lattice/agent/v1/agent.proto"
FILES = ("agent_pb2.py", "agent_pb2.pyi", "agent_pb2_grpc.py")


def generate() -> dict[str, str]:
    """The stubs `grpcio-tools` makes from the proto, as file name -> text."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                PROTO,
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed with {code} on {PROTO_ROOT / PROTO}")
        gen = Path(tmp) / "lattice" / "agent" / "v1"
        out = {}
        for name in FILES:
            text = (gen / name).read_text()
            # The stubs live inside this package, not as a top-level `lattice` package.
            text = text.replace("from lattice.agent.v1 import agent_pb2", "from . import agent_pb2")
            out[name] = text
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = ap.parse_args()
    fresh = generate()
    stale = [n for n, t in fresh.items() if not (OUT / n).is_file() or (OUT / n).read_text() != t]
    if args.check:
        for n in stale:
            print(f"{OUT / n} does not match {PROTO}: run python -m lattice_agents._generate", file=sys.stderr)
        return 1 if stale else 0
    for n, t in fresh.items():
        (OUT / n).write_text(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
