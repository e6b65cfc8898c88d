"""A real MCP server for the tests, written with the official SDK (``mcp.server.mcpserver``).

python tests/mcp_server.py stdio | http PORT

Tools (the annotations are what Keel reads):

* ``lookup(sku)``        readOnlyHint: the stock line of a SKU;
* ``delete_record(id)``  destructiveHint, not idempotent: appends ``delete <id>`` to the
  effects file (``MCP_EFFECTS``), the side effect the tests count;
* ``archive(id)``        idempotentHint (a write that may be repeated): appends ``archive <id>``.

``MCP_DIE_ONCE=<marker file>,<tool>``: the first call of ``<tool>`` (per marker file) does its
work and then kills the server process before answering: the server dies mid-call.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

server = MCPServer("keel-test-files")


def _effect(line: str) -> None:
    path = os.environ.get("MCP_EFFECTS")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _maybe_die(tool: str) -> None:
    spec = os.environ.get("MCP_DIE_ONCE", "")
    marker, _, which = spec.partition(",")
    if marker and which == tool and not Path(marker).exists():
        Path(marker).write_text("died")
        os._exit(3)  # no answer, no cleanup: a crash mid-call


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def lookup(sku: str) -> str:
    """Stock level of a SKU."""
    _maybe_die("lookup")
    return f"{sku}: 7 in stock"


@server.tool(annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=False))
def delete_record(id: str) -> str:
    """Delete a record for good."""
    _effect(f"delete {id}")
    _maybe_die("delete_record")
    return f"deleted {id}"


@server.tool(annotations=ToolAnnotations(destructive_hint=False, idempotent_hint=True))
def archive(id: str) -> str:
    """Archive a record (archiving twice changes nothing)."""
    _effect(f"archive {id}")
    return f"archived {id}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
