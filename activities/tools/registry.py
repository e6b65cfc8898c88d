"""The tool registry: a tool is declared once, with its input model, function and metadata.

``@tool(...)`` registers an async function taking ``(ctx, args)``; the pydantic input model
is both the validator for arguments (a planner's bad arguments never reach the function) and
the JSON schema the planner sees. The metadata (``ToolInfo``) is what the workflow gets: it
never imports tool code, only a snapshot of declarations taken at the start of a run.

``sandbox=SandboxSpec(...)`` declares that the tool runs programs: its function calls
``ctx.run(argv, files=...)``, which confines them as the spec says
(``activities/sandbox.py``). A worker that cannot run bubblewrap does not register such
tools at all (one log line names them), so no plan can reach an unconfined code tool. A
spec with ``network=True`` adds the permission ``sandbox:network``: only the policy can
grant a tool the network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import AsyncConnection
from pydantic import BaseModel

from keel.activities.sandbox import SandboxError, SandboxResult, SandboxSpec, run_sandboxed, sandbox_available
from keel.errors import INVALID_TOOL_ARGUMENTS, TOOL_PERMANENT_ERROR, KeelError
from keel.models import StepGate, ToolInfo

__all__ = [
    "Tool",
    "ToolContext",
    "ToolError",
    "LimitExceeded",
    "tool",
    "REGISTRY",
    "REFUSED",
    "declared",
    "NETWORK_PERMISSION",
]

NETWORK_PERMISSION = "sandbox:network"
"""Added to a sandboxed tool whose spec shares the network: the policy must grant it."""


class ToolError(KeelError):
    """A tool's own failure. ``retryable`` decides whether Temporal tries again."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class LimitExceeded(ToolError):
    """A policy limit the tool enforced itself refused the call (never retried): the tool
    activity records it as a ``deny`` audit row naming ``rule``, and no effect happens."""

    def __init__(self, message: str, *, rule: str, amount: float | None = None) -> None:
        super().__init__(message, retryable=False)
        self.rule = rule
        self.amount = amount


@dataclass(frozen=True)
class ToolContext:
    """What a tool may use: a connection inside the effect's transaction and who asked."""

    conn: AsyncConnection[Any]
    tenant: str
    user: str
    idempotency_key: str
    sandbox: SandboxSpec | None = None
    """Set for tools declared with ``sandbox=``; :meth:`run` confines programs with it."""
    gate: StepGate | None = None
    """The workflow's allow decision (approver, the policy's cumulative limits), when the
    step came through the gate; tools that move money re-check limits against it."""

    async def run(
        self, argv: Sequence[str], *, files: Mapping[str, bytes | str] | None = None
    ) -> SandboxResult:
        """Run ``argv`` in this tool's sandbox. A refused executable is a permanent error."""
        if self.sandbox is None:
            raise ToolError("this tool is not declared with sandbox=, so it may not run programs")
        try:
            return await run_sandboxed(argv, self.sandbox, files=files)
        except SandboxError as e:
            raise ToolError(str(e)) from e


ToolFn = Callable[[ToolContext, Any], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Tool:
    info: ToolInfo
    args_model: type[BaseModel]
    fn: ToolFn
    sandbox: SandboxSpec | None = None
    module: str = ""
    """The module that declared it (``keel tools list`` says where a tool comes from)."""


REGISTRY: dict[str, Tool] = {}

REFUSED: dict[str, str] = {}
"""Sandboxed tools this worker did not register, and why (bwrap missing or unusable)."""


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
    sandbox: SandboxSpec | None = None,
    tags: tuple[str, ...] = (),
    facts: dict[str, str] | None = None,
    local: bool = False,
) -> Callable[[ToolFn], ToolFn]:
    """Register ``fn`` as tool ``name``. ``hidden`` tools (compensations) are never planned;
    ``sandbox`` tools run their programs confined (and are refused where that is impossible).

    ``tags`` let an agent definition pick tools by tag (``tools: ["tag:orders"]``).
    ``facts`` maps a result field to a gate-context fact the policy can reference
    (``{"customer_email": "order_customer"}``: an address looked up by this tool becomes an
    allowed ``one_of_ref: order_customer`` value for later steps of the same run).
    ``local``: the tool is quick and works only through ``ctx.conn`` (milliseconds, no
    outside call): its steps run as local activities. A sandboxed or rate-limited tool never
    does (a local activity holds its workflow task and bypasses the tool's task queue).
    """

    def register(fn: ToolFn) -> ToolFn:
        if local and (sandbox is not None or rate_limit_per_second):
            raise ValueError(f"tool {name!r}: a sandboxed or rate-limited tool cannot be local")
        if name in REGISTRY:
            first = REGISTRY[name].module or "?"
            raise ValueError(
                f"tool {name!r} is declared twice (in {first} and in {fn.__module__}); tool names are global"
            )
        perms = permissions
        timeout = timeout_seconds
        run = fn
        if sandbox is not None:
            ok, why = sandbox_available()
            if not ok:
                REFUSED[name] = why
                return fn
            if sandbox.limits.network and NETWORK_PERMISSION not in perms:
                perms = (*perms, NETWORK_PERMISSION)
            # The activity must outlive the sandbox's own wall clock, or Temporal would
            # retry a run the sandbox was about to report as timed out.
            timeout = max(timeout, sandbox.limits.wall_seconds + 10)

            async def run(ctx: ToolContext, a: Any) -> dict[str, Any]:
                return await fn(dataclasses.replace(ctx, sandbox=sandbox), a)

        schema = args.model_json_schema()
        schema.pop("title", None)
        info = ToolInfo(
            name=name,
            description=description,
            args_schema=schema,
            permissions=perms,
            idempotent=idempotent,
            side_effects=side_effects,
            compensation=compensation,
            fallback=fallback,
            timeout_seconds=timeout,
            max_attempts=max_attempts,
            cost_micros=round(cost_usd * 1_000_000),
            risk=risk,
            optional=optional,
            rate_limit_per_second=rate_limit_per_second,
            non_retryable_errors=(TOOL_PERMANENT_ERROR, INVALID_TOOL_ARGUMENTS),
            tags=tuple(tags),
            facts=dict(facts or {}),
            local=local,
        )
        REGISTRY[name] = Tool(info=info, args_model=args, fn=run, sandbox=sandbox, module=fn.__module__)
        if hidden:
            _HIDDEN.add(name)
        return fn

    return register


_HIDDEN: set[str] = set()


def declared(include_hidden: bool = False) -> tuple[ToolInfo, ...]:
    """The declarations registered so far, sorted by name. ``loader.catalog`` loads every tool
    module first; this module never imports one, so tool modules import it without a cycle."""
    return tuple(t.info for n, t in sorted(REGISTRY.items()) if include_hidden or n not in _HIDDEN)
