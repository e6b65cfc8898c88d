"""Test tools: slow, flaky, failing, degradable and compensatable tools for recovery tests.

A tool package like any other: a worker serves them when its environment says
``KEEL_TOOL_MODULES=tests.doubles.tools`` (workers started by tests run from the repository
root, so the module imports), and importing the module declares them. Production catalogues
never show them. Every tool needs the ``test:run`` permission, which only test policies
grant. Effects go to the ``test_effects`` table (``tests/doubles/tools.sql``, which the test
fixtures apply after Keel's migrations) inside the tool activity's own transaction, so a
crash, retry or cancellation leaves either one row or none.

Transient failures count Temporal's attempt number (``activity.info().attempt``): the server
keeps it, so a tool "fails twice, then works" across retries and across workers alike.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from temporalio import activity

from keel.activities.tools import REGISTRY, ToolContext, ToolError, tool

__all__ = ["MODULE", "TEST_PERMISSION", "TEST_TOOLS", "policy_yaml", "register"]

MODULE = __name__
"""What a test puts in ``KEEL_TOOL_MODULES`` for a worker to serve these tools."""

TEST_PERMISSION = "test:run"
TEST_TOOLS = (
    "slow_step",
    "flaky",
    "always_fail",
    "test_effect",
    "undo_test_effect",
    "fragile_fetch",
    "cached_fetch",
    "echo",
)


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlowStep(_Args):
    seconds: float = Field(ge=0, le=120, description="How long the step takes")
    note: str = ""


class Flaky(_Args):
    failures: int = Field(ge=0, le=10, description="Attempts that fail before one succeeds")
    note: str = ""


class Note(_Args):
    note: str = ""


class Effect(_Args):
    note: str = ""
    undo_failures: int = Field(
        default=0, ge=0, le=10, description="Attempts of the compensation that fail first"
    )


class Undo(_Args):
    effect: dict[str, Any]


class Fetch(_Args):
    key: str = Field(min_length=1, max_length=64)


async def _record(ctx: ToolContext, tool_name: str, note: str) -> int:
    row = await (
        await ctx.conn.execute(
            "insert into test_effects (tool, note, idempotency_key) values (%s,%s,%s) returning id",
            (tool_name, note, ctx.idempotency_key),
        )
    ).fetchone()
    assert row is not None
    return int(row[0])


def _attempt() -> int:
    return activity.info().attempt if activity.in_activity() else 1


async def _slow_step(ctx: ToolContext, a: SlowStep) -> dict[str, Any]:
    # The effect row is written first and committed only if the sleep ends: a kill or a
    # cancellation mid-sleep rolls it back with the rest of the transaction.
    effect_id = await _record(ctx, "slow_step", a.note)
    await asyncio.sleep(a.seconds)
    return {"effect_id": effect_id, "slept_s": a.seconds, "attempt": _attempt()}


async def _flaky(ctx: ToolContext, a: Flaky) -> dict[str, Any]:
    attempt = _attempt()
    if attempt <= a.failures:
        raise ToolError(f"transient failure {attempt} of {a.failures}", retryable=True)
    return {"attempt": attempt, "note": a.note}


async def _always_fail(ctx: ToolContext, a: Note) -> dict[str, Any]:
    raise ToolError(f"always_fail refuses ({a.note or 'by design'})")


async def _test_effect(ctx: ToolContext, a: Effect) -> dict[str, Any]:
    effect_id = await _record(ctx, "test_effect", a.note)
    return {"effect_id": effect_id, "note": a.note, "undo_failures": a.undo_failures}


async def _undo_test_effect(ctx: ToolContext, a: Undo) -> dict[str, Any]:
    effect_id = a.effect.get("effect_id")
    if not isinstance(effect_id, int):
        raise ToolError("undo_test_effect needs the effect_id of the effect to undo")
    attempt = _attempt()
    if attempt <= int(a.effect.get("undo_failures", 0)):
        raise ToolError(f"undo of effect {effect_id} failed transiently (attempt {attempt})", retryable=True)
    await ctx.conn.execute(
        "update test_effects set status='undone', undone_at=clock_timestamp() where id=%s and status='done'",
        (effect_id,),
    )
    return {"effect_id": effect_id, "status": "undone", "attempt": attempt}


async def _fragile_fetch(ctx: ToolContext, a: Fetch) -> dict[str, Any]:
    raise ToolError(f"upstream for {a.key} is down")


async def _cached_fetch(ctx: ToolContext, a: Fetch) -> dict[str, Any]:
    return {"key": a.key, "value": f"cached:{a.key}", "stale": True}


async def _echo(ctx: ToolContext, a: Note) -> dict[str, Any]:
    return {"note": a.note}


def register() -> None:
    """Declare the test tools (idempotent: importing the module already did, and an in-process
    test may call it again after the registry was reset)."""
    if "slow_step" in REGISTRY:
        return
    perms = (TEST_PERMISSION,)
    tool(
        "slow_step",
        description="Sleep N seconds, then record an effect (recovery tests).",
        args=SlowStep,
        permissions=perms,
        side_effects=True,
        timeout_seconds=120,
        max_attempts=3,
    )(_slow_step)
    tool(
        "flaky",
        description="Fail transiently for the first N attempts, then succeed.",
        args=Flaky,
        permissions=perms,
        timeout_seconds=10,
        max_attempts=5,
    )(_flaky)
    tool(
        "always_fail",
        description="Fail permanently (error-cascade tests).",
        args=Note,
        permissions=perms,
        timeout_seconds=10,
    )(_always_fail)
    tool(
        "test_effect",
        description="Record a side effect that can be undone.",
        args=Effect,
        permissions=perms,
        idempotent=False,
        side_effects=True,
        compensation="undo_test_effect",
        timeout_seconds=10,
    )(_test_effect)
    tool(
        "undo_test_effect",
        description="Undo a test_effect (compensation).",
        args=Undo,
        permissions=perms,
        side_effects=True,
        timeout_seconds=10,
        max_attempts=10,
        hidden=True,
    )(_undo_test_effect)
    tool(
        "fragile_fetch",
        description="Fetch a value from an upstream that is always down.",
        args=Fetch,
        permissions=perms,
        fallback="cached_fetch",
        timeout_seconds=10,
    )(_fragile_fetch)
    tool(
        "cached_fetch",
        description="Fetch a (stale) value from the local cache.",
        args=Fetch,
        permissions=perms,
        timeout_seconds=10,
    )(_cached_fetch)
    tool(
        "echo",
        description="Return the note (loop and cap tests).",
        args=Note,
        permissions=perms,
        timeout_seconds=10,
    )(_echo)


# ---------------------------------------------------------------------- test policy
def policy_yaml(*, approval_timeout_seconds: int = 3600, **limits: Any) -> str:
    """A policy for recovery tests: alice of acme may use the test and demo tools.

    ``echo`` only accepts lower-case notes (so a test can make a step be denied), and a
    ``test_effect`` whose note is ``approve-me`` needs a human, with the given timeout.
    """
    lim = {
        "max_iterations": 3,
        "max_tool_calls": 12,
        "deadline_seconds": 60,
        "thrash_repeats": 3,
        "max_consecutive_failures": 3,
        "min_confidence": 0.5,
        **limits,
    }
    lines = "\n".join(f"  {k}: {v}" for k, v in lim.items())
    return f"""version: "2026-11-01.1"
roles:
  tester: [{TEST_PERMISSION}, orders:read, inventory:read, refunds:write, email:send]
tenants:
  acme:
    users:
      alice: [tester]
tools:
  echo:
    constraints:
      - name: echo-lowercase
        arg: note
        pattern: "[a-z0-9 :-]*"
        message: notes are lower-case words
  test_effect:
    approvals:
      - name: effect-needs-approval
        when: {{arg: note, equals: approve-me}}
        timeout_seconds: {approval_timeout_seconds}
        on_timeout: reject
limits:
{lines}
"""


register()
