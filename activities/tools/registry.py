"""The tool registry: a tool is declared once, with its input model, function and metadata.

``@tool(...)`` registers an async function taking ``(ctx, args)``; the pydantic input model
is both the validator for arguments (a planner's bad arguments never reach the function) and
the JSON schema the planner sees. The metadata (``ToolInfo``) is what the workflow gets: it
never imports tool code, only a snapshot of declarations taken at the start of a run.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import AsyncConnection
from pydantic import BaseModel

from keel.models import ToolInfo

__all__ = ["Tool", "ToolContext", "ToolError", "tool", "REGISTRY", "catalog"]


class ToolError(Exception):
    """A tool's own failure. ``retryable`` decides whether Temporal tries again."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class ToolContext:
    """What a tool may use: a connection inside the effect's transaction and who asked."""

    conn: AsyncConnection[Any]
    tenant: str
    user: str
    idempotency_key: str


ToolFn = Callable[[ToolContext, Any], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Tool:
    info: ToolInfo
    args_model: type[BaseModel]
    fn: ToolFn


REGISTRY: dict[str, Tool] = {}


def tool(
    name: str,
    *,
    description: str,
    args: type[BaseModel],
    permissions: tuple[str, ...] = (),
    idempotent: bool = True,
    side_effects: bool = False,
    compensation: str | None = None,
    fallback: str | None = None,
    timeout_seconds: float = 30.0,
    max_attempts: int = 3,
    cost_usd: float = 0.0,
    risk: Literal["low", "medium", "high"] = "low",
    optional: bool = False,
    rate_limit_per_second: float | None = None,
    hidden: bool = False,
) -> Callable[[ToolFn], ToolFn]:
    """Register ``fn`` as tool ``name``. ``hidden`` tools (compensations) are never planned."""

    def register(fn: ToolFn) -> ToolFn:
        if name in REGISTRY:
            raise ValueError(f"tool {name!r} is declared twice")
        schema = args.model_json_schema()
        schema.pop("title", None)
        info = ToolInfo(
            name=name,
            description=description,
            args_schema=schema,
            permissions=permissions,
            idempotent=idempotent,
            side_effects=side_effects,
            compensation=compensation,
            fallback=fallback,
            timeout_seconds=timeout_seconds,
            max_attempts=max_attempts,
            cost_micros=round(cost_usd * 1_000_000),
            risk=risk,
            optional=optional,
            rate_limit_per_second=rate_limit_per_second,
            non_retryable_errors=("ToolPermanentError", "InvalidToolArguments"),
        )
        REGISTRY[name] = Tool(info=info, args_model=args, fn=fn)
        if hidden:
            _HIDDEN.add(name)
        return fn

    return register


_HIDDEN: set[str] = set()


def catalog(include_hidden: bool = False) -> tuple[ToolInfo, ...]:
    """All tool declarations, sorted by name (the snapshot a run works from)."""
    _load_builtin_tools()
    return tuple(t.info for n, t in sorted(REGISTRY.items()) if include_hidden or n not in _HIDDEN)


def _load_builtin_tools() -> None:
    from activities.tools import demo  # noqa: F401  (registers on import)

    if os.environ.get("KEEL_TEST_TOOLS") == "1":  # recovery tests only; see tools/testing.py
        from activities.tools import testing

        testing.register()
