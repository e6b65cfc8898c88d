"""MCP servers as tools, through the official ``mcp`` SDK (stdio and streamable HTTP).

Two moments, both activity-side:

* **Listing** (``list_server_tools``, called by ``prepare_run``): the agent's servers are
  asked for their tools when a run starts; each becomes a ``ToolInfo`` named
  ``<server>.<tool>`` in the run's snapshot, so replay never asks a server anything and a
  server that changes its tools mid-run cannot change the run's decisions.
* **Calling** (``mcp_spec``): ``run_tool`` finds no ``@tool`` of that name and asks here for
  a spec whose function calls the server. The call then takes exactly the path a native
  tool's does: the gate's decision audited, its budget reserved, the breaker
  ``tool:<server>.<tool>``, the result recorded under the idempotency key with the ledger
  commit in one transaction (so a retried call that had finished is answered from the
  record, never sent again).

Behaviour comes from the tool's annotations, with the agent's per-tool overrides first:
``readOnlyHint`` (no side effects), ``destructiveHint`` (risk high), ``idempotentHint``.
A tool that writes and is not idempotent has no idempotency mechanism Keel can use (MCP
has no idempotency key), so it is **at-most-once**: one attempt, never retried after it
may have run — also not after a worker crash or a server dying mid-call; the failure says
so and the step fails (or takes its fallback). Read-only and idempotent tools are retried
like any tool. A stdio server is started per call (a crashed one costs nothing later); an
HTTP server is connected per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from keel.activities.tools.registry import Tool, ToolContext, ToolError
from keel.agents import Agent, McpServer
from keel.errors import INVALID_TOOL_ARGUMENTS, TOOL_PERMANENT_ERROR
from keel.models import ToolInfo

__all__ = ["McpArguments", "list_server_tools", "mcp_spec", "server_tools"]

log = logging.getLogger(__name__)

AT_MOST_ONCE = "at-most-once: writes and is not idempotent, so it is never retried after it may have run"
RETRYING_ATTEMPTS = 3
"""Attempts of a read-only or idempotent MCP tool (Temporal retries them)."""
LIST_TIMEOUT_S = 10.0
"""Listing one server at a run's start may take this long (a stdio server starts first);
past it the run goes on without that server's tools (``prepare_run`` has 30 s in all)."""
_RETRY_SAFE: dict[str, bool] = {}
"""``<server>.<tool>`` -> retried or not, as this process last listed it (for messages only:
the attempt count itself comes from the run's snapshot)."""


class McpArguments(BaseModel):
    """Arguments pass through as given; the server validates them against its schema."""

    model_config = ConfigDict(extra="allow", frozen=True)


def _expand(value: str) -> str:
    """``${VAR}`` from the worker's environment (secrets never live in definitions)."""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: os.environ.get(m.group(1), ""), value)


@contextlib.asynccontextmanager
async def _connected(server: McpServer) -> AsyncIterator[Any]:
    """An initialised ``mcp.Client`` session with ``server``, closed (with its HTTP client or
    its subprocess) on exit."""
    import mcp

    async with contextlib.AsyncExitStack() as stack:
        if server.transport == "stdio":
            params = mcp.StdioServerParameters(
                command=_expand(server.command),
                args=[_expand(a) for a in server.args],
                env={**os.environ, **{k: _expand(v) for k, v in server.env.items()}},
                cwd=server.cwd,
            )
            target: Any = params
        elif server.headers:
            import httpx2  # the SDK's HTTP client
            from mcp.client.streamable_http import streamable_http_client

            http = await stack.enter_async_context(
                httpx2.AsyncClient(
                    headers={k: _expand(v) for k, v in server.headers.items()}, timeout=server.timeout_seconds
                )
            )
            target = streamable_http_client(_expand(server.url), http_client=http)
        else:
            target = _expand(server.url)
        mode = "legacy" if server.transport == "stdio" else "auto"
        yield await stack.enter_async_context(
            mcp.Client(target, read_timeout_seconds=server.timeout_seconds, mode=mode)
        )


def _info(server: McpServer, tool: Any) -> ToolInfo | None:
    over = server.tools.get(tool.name)
    if over is not None and over.hidden:
        return None
    ann = tool.annotations
    read_only = bool(ann and ann.read_only_hint)
    destructive = bool(ann.destructive_hint) if ann and ann.destructive_hint is not None else not read_only
    idempotent = bool(ann and ann.idempotent_hint)
    if over is not None:
        read_only = over.read_only if over.read_only is not None else read_only
        destructive = over.destructive if over.destructive is not None else destructive
        idempotent = over.idempotent if over.idempotent is not None else idempotent
    retry_safe = read_only or idempotent
    description = (tool.description or tool.title or tool.name).strip()[:1000]
    if not retry_safe:
        description += f" ({AT_MOST_ONCE})"
    schema = dict(tool.input_schema or {"type": "object"})
    schema.pop("title", None)
    perms = tuple(dict.fromkeys((*server.permissions, *((over.permissions or ()) if over else ()))))
    return ToolInfo(
        name=f"{server.name}.{tool.name}",
        description=description,
        args_schema=schema,
        permissions=perms,
        idempotent=retry_safe,
        side_effects=not read_only,
        timeout_seconds=server.timeout_seconds,
        max_attempts=RETRYING_ATTEMPTS if retry_safe else 1,
        cost_micros=round(server.cost_usd * 1_000_000),
        risk="high" if destructive and not read_only else ("low" if read_only else "medium"),
        rate_limit_per_second=server.rate_limit_per_second,
        queue=f"mcp-{server.name}" if server.rate_limit_per_second else None,
        non_retryable_errors=(TOOL_PERMANENT_ERROR, INVALID_TOOL_ARGUMENTS),
        tags=("mcp", f"mcp:{server.name}"),
        facts={},
    )


async def list_server_tools(server: McpServer) -> tuple[ToolInfo, ...]:
    """The server's tools as ``ToolInfo``s (raises on a server that cannot be reached)."""
    async with _connected(server) as client:
        found, cursor = [], None
        while True:
            page = await client.list_tools(cursor=cursor)
            found += page.tools
            cursor = page.next_cursor
            if not cursor:
                break
    infos = tuple(i for i in (_info(server, t) for t in sorted(found, key=lambda t: t.name)) if i)
    _RETRY_SAFE.update({i.name: i.idempotent for i in infos})
    return infos


async def server_tools(agent: Agent) -> tuple[tuple[ToolInfo, ...], dict[str, str]]:
    """Every tool of the agent's servers, and why each server that could not be listed was
    not (its tools are then absent from the run: the planner cannot pick what is not there)."""

    async def one(server: McpServer) -> tuple[ToolInfo, ...] | BaseException:
        try:
            return await asyncio.wait_for(list_server_tools(server), LIST_TIMEOUT_S)
        except Exception as e:  # unreachable, crashed, or too slow to start
            return e

    tools: list[ToolInfo] = []
    problems: dict[str, str] = {}
    for server, got in zip(agent.mcp, await asyncio.gather(*(one(s) for s in agent.mcp)), strict=True):
        if isinstance(got, BaseException):
            why = f"no answer within {LIST_TIMEOUT_S:g} s" if isinstance(got, TimeoutError) else _leaf(got)
            problems[server.name] = f"MCP server {server.name!r}: {why}"
            log.warning("agent %s: %s", agent.name, problems[server.name])
        else:
            tools += got
    return tuple(tools), problems


def _first(e: BaseException) -> str:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _leaf(e: BaseException) -> str:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {_first(e)}"


def mcp_spec(name: str, servers: Mapping[str, McpServer]) -> Tool | None:
    """A spec for ``<server>.<tool>`` when ``servers`` (the MCP servers this worker's agents
    define, by name: ``keel.worker`` hands them to ``ToolActivities``) has that server. The
    tools package reads no agent definitions: they check themselves against its catalogue."""
    server_name, sep, tool_name = name.partition(".")
    server = servers.get(server_name) if sep else None
    if server is None:
        return None
    info = ToolInfo(
        name=name,
        description=f"MCP tool {tool_name} of {server_name}",
        timeout_seconds=server.timeout_seconds,
        cost_micros=round(server.cost_usd * 1_000_000),
    )

    async def call(ctx: ToolContext, args: McpArguments) -> dict[str, Any]:
        return await _call(server, tool_name, args.model_dump())

    return Tool(info=info, args_model=McpArguments, fn=call, module=f"mcp:{server_name}")


async def _call(server: McpServer, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    sent = False
    try:
        async with _connected(server) as client:
            sent = True
            result = await client.call_tool(tool, arguments)
    except Exception as e:  # the server died, hung up or timed out
        where = "mid-call" if sent else "before the call"
        if sent:
            safe = _RETRY_SAFE.get(f"{server.name}.{tool}")
            where += (
                f"; {tool} may have run and is {AT_MOST_ONCE}"
                if safe is False
                else ("; retried" if safe else "; it may have run (a non-idempotent tool is not retried)")
            )
        log.warning("MCP server %s failed %s calling %s", server.name, where, tool, exc_info=e)
        # ``from None``: the run reports a failure's innermost cause, and here that is an
        # anyio ExceptionGroup saying nothing; this message names what happened (logged above).
        raise ToolError(f"MCP server {server.name!r} failed {where}: {_leaf(e)}", retryable=True) from None
    text = "\n".join(getattr(c, "text", "") for c in result.content if getattr(c, "type", "") == "text")
    if result.is_error:
        raise ToolError(f"{tool}: {text[:300] or 'the server reported an error'}")
    out: dict[str, Any] = {"text": text[:4000]}
    if isinstance(result.structured_content, dict):
        out["structured"] = result.structured_content
    return out
