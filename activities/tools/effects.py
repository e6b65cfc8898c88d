"""The durable record of tool effects (``tool_effects``): the one thing that decides whether a
step's effect happened.

Every attempt at a key — a Temporal retry, a zombie attempt the server already timed out,
a second worker — takes a transaction-scoped advisory lock on the key inside the effect's
own transaction and looks for a record before it runs the tool. So attempts on one key are
serialised for their whole duration, and a loser returns the winner's effect instead of
running the tool's checks against it. When the workflow gives up on a step it *fences* the
key under the same lock: if an effect was recorded the step succeeded after all; if not, an
``abandoned`` record makes every later attempt stop before it acts.

At rest a record is the redacted result (readable with SQL, safe to export) plus the exact
result sealed under the payload keys (``keel.codec.seal``), which is what a replay returns;
without keys (tool harnesses) only the redacted copy is kept.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from keel.codec import KeyRing, open_sealed, seal
from keel.models import ToolResult
from keel.redact import redact_data

__all__ = [
    "MAX_RESULT_BYTES",
    "at_rest",
    "fence",
    "from_row",
    "lock",
    "lock_statement",
    "record_statement",
    "recorded",
    "recorded_statement",
    "shrink",
]

MAX_RESULT_BYTES = 4096
"""Results larger than this stay in ``tool_effects``; history carries a reference + summary."""


def lock_statement(key: str) -> tuple[str, tuple[Any, ...]]:
    """The key's transaction-scoped advisory lock, then its record read under the lock
    (``keel_tool_effect_lock``, migration 015, the one place the lock's hash is spelled), for
    callers that pipeline it; ``from_row`` parses its row."""
    return "select keel_tool_effect_lock(%s)", (key,)


async def lock(conn: psycopg.AsyncConnection[Any], key: str) -> None:
    """Serialise every attempt on ``key`` until the current transaction ends."""
    await conn.execute(*lock_statement(key), prepare=True)


def recorded_statement(key: str) -> tuple[str, tuple[Any, ...]]:
    """The lookup of ``key``'s record, for callers that pipeline it (parse with ``from_row``)."""
    return "select result from tool_effects where idempotency_key=%s", (key,)


def record_statement(
    key: str, tool: str, tenant: str, result: ToolResult, keys: KeyRing | None
) -> tuple[str, tuple[Any, ...]]:
    """The insert of a successful effect's record (its result at rest, see ``at_rest``)."""
    return (
        "insert into tool_effects (idempotency_key, tool, tenant, ok, result) values (%s,%s,%s,true,%s)",
        (key, tool, tenant, Jsonb(at_rest(result, keys))),
    )


def at_rest(result: ToolResult, keys: KeyRing | None) -> dict[str, Any]:
    """What ``tool_effects.result`` stores: the redacted result, plus the exact one sealed."""
    full = result.model_dump(mode="json")
    stored = redact_data(full)
    if keys is not None:
        stored["sealed"] = seal(keys, full)
    return stored


async def recorded(
    conn: psycopg.AsyncConnection[Any], key: str, keys: KeyRing | None = None
) -> ToolResult | None:
    """The effect recorded under ``key`` (marked replayed), or None. A record sealed under a
    key id this process lacks raises the non-retryable ``UnknownKeyError`` naming it."""
    row = await (await conn.execute(*recorded_statement(key), prepare=True)).fetchone()
    return from_row(row, key, keys)


def from_row(row: Any, key: str, keys: KeyRing | None = None) -> ToolResult | None:
    """The result ``recorded_statement`` (or ``lock_statement``) found, marked replayed; None
    for no row, or a null record (``lock_statement`` always answers one row)."""
    if row is None or row[0] is None:
        return None
    stored = dict(row[0])
    sealed = stored.pop("sealed", None)
    if sealed is not None and keys is not None:
        stored = open_sealed(keys, sealed)
    return shrink(ToolResult.model_validate(stored).model_copy(update={"replayed": True}), key)


async def fence(
    conn: psycopg.AsyncConnection[Any],
    key: str,
    tool: str,
    tenant: str,
    reason: str,
    keys: KeyRing | None = None,
) -> ToolResult | None:
    """Decide a step the workflow is about to declare failed, in the caller's transaction.

    Returns the recorded effect if there is one (the step succeeded), else records the key
    as abandoned so no attempt still in flight can act on it later, and returns None.
    """
    await lock(conn, key)
    found = await recorded(conn, key, keys)
    if found is not None:
        return found if found.ok else None
    abandoned = ToolResult(ok=False, error=f"abandoned: {reason}"[:300])
    await conn.execute(
        "insert into tool_effects (idempotency_key, tool, tenant, ok, result) values (%s,%s,%s,false,%s)",
        (key, tool, tenant, Jsonb(at_rest(abandoned, keys))),
    )
    return None


def shrink(result: ToolResult, key: str) -> ToolResult:
    """Keep large content out of workflow history: the full result stays in PostgreSQL."""
    if len(json.dumps(result.data, default=str)) <= MAX_RESULT_BYTES:
        return result
    small = {
        k: v
        for k, v in result.data.items()
        if not isinstance(v, dict | list | str) or (isinstance(v, str) and len(v) <= 200)
    }
    small["_ref"] = f"tool_effects:{key}"
    small["_truncated"] = True
    return result.model_copy(update={"data": small})
