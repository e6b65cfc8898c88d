"""Session memory in PostgreSQL: full turns stay in the database, the run sees a summary.

Memory is keyed by ``(tenant, owner, session)`` where ``owner`` is the requesting user, so
one user's turns (and whatever their runs read) never reach another user's planning prompt;
``owner=""`` is a session the tenant's policy shares across users (``shared_memory``).
``author`` records who made each request either way. Memory is untrusted input: only plans
made after the first see it (see ``activities/agent.py``).

A second request in the same ``(tenant, owner, session)`` sees the first through ``load``. Turns are
saved once per run (unique per workflow id, so a retried save is a no-op) and redacted
before they are written. Past ``MAX_TURNS`` the oldest turns are folded into the summary and
deleted, so memory stays bounded however long a session lives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from keel.text import scrub

__all__ = ["load", "queue_load", "queue_save", "save", "MAX_TURNS", "MAX_SUMMARY_CHARS"]

MAX_TURNS = 20
"""Turns kept verbatim per session; older ones are folded into the summary."""
MAX_SUMMARY_CHARS = 1500
"""Bound on what a run carries in history (the planner's memory input)."""


async def load(conn: psycopg.AsyncConnection[Any], tenant: str, session: str, owner: str = "") -> str:
    """The session's summary followed by its most recent turns, bounded in size."""
    return await (await queue_load(conn, tenant, session, owner))()


async def queue_load(
    conn: psycopg.AsyncConnection[Any], tenant: str, session: str, owner: str = ""
) -> Callable[[], Awaitable[str]]:
    """``load``'s two reads sent before either is read; the returned function reads them.

    In a pipeline (``conn.pipeline()``) both queries share the round trip of whatever else
    the caller queued; outside one this is ``load``.
    """
    summary_cur = await conn.execute(
        "select summary from memory_summaries where tenant=%s and owner=%s and session=%s",
        (tenant, owner, session),
    )
    turns_cur = await conn.execute(
        "select role, content from memory_turns where tenant=%s and owner=%s and session=%s "
        "order by id desc limit 6",
        (tenant, owner, session),
    )

    async def read() -> str:
        summary = await summary_cur.fetchone()
        rows = await turns_cur.fetchall()
        recent = "\n".join(f"{role}: {content[:180]}" for role, content in reversed(rows))
        if not summary:
            return recent[-MAX_SUMMARY_CHARS:]
        room = max(0, MAX_SUMMARY_CHARS - len(recent) - len("Earlier: \n"))
        return f"Earlier: {summary[0][-room:]}\n{recent}"

    return read


async def save(
    conn: psycopg.AsyncConnection[Any],
    tenant: str,
    session: str,
    workflow_id: str,
    user_text: str,
    assistant_text: str,
    owner: str = "",
    author: str = "",
) -> None:
    """Append this run's turn (idempotent per workflow id) and fold old turns if needed."""
    async with conn.transaction():
        await queue_save(conn, tenant, session, workflow_id, user_text, assistant_text, owner, author)


_FOLD = """
with old as (
    select id, role, content from memory_turns
    where tenant = %(tenant)s and owner = %(owner)s and session = %(session)s
    order by id desc offset %(keep)s
), prev as (
    select summary from memory_summaries
    where tenant = %(tenant)s and owner = %(owner)s and session = %(session)s
    for update
), folded as (
    insert into memory_summaries (tenant, owner, session, summary, turns)
    select %(tenant)s, %(owner)s, %(session)s,
           right(coalesce((select summary from prev) || ' | ', '')
                 || string_agg(role || ': ' || left(content, 120), ' | ' order by id), %(room)s),
           count(*)
    from old having count(*) > 0
    on conflict (tenant, owner, session) do update set summary = excluded.summary,
        turns = memory_summaries.turns + excluded.turns, updated_at = now()
)
delete from memory_turns where id in (select id from old)
"""
"""The fold in one statement: the turns past ``keep`` (oldest first, each cut to 120
characters) are appended to the session's summary (locked, kept to its last ``room``
characters) and deleted. Nothing is read back, so in a pipeline it never waits: the
ending's writes and its commit share one round trip however long the session is."""


async def queue_save(
    conn: psycopg.AsyncConnection[Any],
    tenant: str,
    session: str,
    workflow_id: str,
    user_text: str,
    assistant_text: str,
    owner: str = "",
    author: str = "",
) -> None:
    """``save`` inside the caller's transaction: the turn's two rows and the fold of turns
    past ``MAX_TURNS`` are sent and not read back (in a pipeline they share the round trip
    of the caller's other statements and its commit)."""
    row = (tenant, owner, author, session, workflow_id)
    await conn.execute(  # both rows in one statement, the user's first (ids keep the order)
        "insert into memory_turns (tenant, owner, author, session, workflow_id, role, content) "
        "values (%s,%s,%s,%s,%s,'user',%s), (%s,%s,%s,%s,%s,'assistant',%s) "
        "on conflict (workflow_id, role) do nothing",
        (*row, scrub(user_text), *row, scrub(assistant_text)),
    )
    await conn.execute(
        _FOLD,
        {"tenant": tenant, "owner": owner, "session": session, "keep": MAX_TURNS, "room": MAX_SUMMARY_CHARS},
        prepare=True,  # planned once per connection: unprepared, planning is most of its cost
    )
