"""Cascade routing (escalate on a low score, stay cheap on a high one, caps force a cheaper
tier) and session memory (a second request in the same session sees the first)."""

from __future__ import annotations

import uuid

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from keel.activities import memory
from keel.settings import Settings
from tests.helpers import make_order, request, run_agent, running_worker


async def test_high_score_stays_on_cheapest_tier(
    client: Client, db_pool: AsyncConnectionPool, temporal_services: Settings, task_queue: str
) -> None:
    order = await make_order(db_pool)
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, request(f"Is order {order} shipped?"))
    assert resp.outcome == "completed"
    assert set(resp.spend.by_tier) == {"fast"}
    assert resp.spend.cheapest_tier_calls == resp.spend.model_calls == 1


async def test_low_score_escalates_one_tier(
    client: Client, db_pool: AsyncConnectionPool, temporal_services: Settings, task_queue: str
) -> None:
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, request("Is order ORD-999999 shipped?"))
    assert resp.outcome == "partial"  # the lookup failed: unknown order
    assert "escalated_to_balanced" in resp.flags
    assert set(resp.spend.by_tier) == {"fast", "balanced"}
    assert resp.spend.cheapest_tier_calls == 1 and resp.spend.model_calls == 2
    assert [(c.role, c.tier, c.escalated) for c in resp.calls] == [
        ("plan", "fast", False),
        ("plan", "balanced", True),
    ]
    assert all(c.input_tokens > 0 and c.cost_micros > 0 for c in resp.calls)


async def test_budget_caps_force_cheaper_tier(
    client: Client, db_pool: AsyncConnectionPool, temporal_services: Settings, task_queue: str
) -> None:
    order = await make_order(db_pool)
    # The plan reservation prices the worst case (~$0.00084 offline); with $0.00095 the ledger
    # grants it but little headroom is left, so it caps the tier to the cheapest.
    req = request(
        f"Is order {order} shipped?",
        max_budget_usd=0.00095,
        model_policy={"min_tier": "balanced", "max_tier": "powerful"},
    )
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, req)
    assert "capped_to_fast" in resp.flags, resp.flags
    assert set(resp.spend.by_tier) == {"fast"}
    assert resp.outcome == "completed"  # the actual cost was far below the reservation
    assert resp.spend.total_micros <= 950


async def test_second_request_in_session_sees_the_first(
    client: Client, db_pool: AsyncConnectionPool, temporal_services: Settings, task_queue: str
) -> None:
    session = f"s-{uuid.uuid4().hex[:8]}"
    order = await make_order(db_pool)
    async with running_worker(client, db_pool, temporal_services, task_queue):
        first = await run_agent(client, task_queue, request(f"Is order {order} shipped?", session=session))
        async with db_pool.connection() as conn:
            seen = await memory.load(conn, "acme", session, "alice")  # memory is per user
        assert order in seen and "shipped" in seen
        await run_agent(client, task_queue, request("And what about the e-mail?", session=session))
    assert first.outcome == "completed"
    async with db_pool.connection() as conn:
        rows = await (
            await conn.execute(
                "select count(*) from memory_turns where tenant='acme' and session=%s", (session,)
            )
        ).fetchone()
    assert rows == (4,)


async def test_memory_is_bounded(db_pool: AsyncConnectionPool) -> None:
    session = f"s-{uuid.uuid4().hex[:8]}"
    async with db_pool.connection() as conn:
        for i in range(memory.MAX_TURNS + 10):
            await memory.save(
                conn, "acme", session, f"wf-{session}-{i}", f"question {i} " * 50, f"answer {i}"
            )
        text = await memory.load(conn, "acme", session)
        kept = await (
            await conn.execute("select count(*) from memory_turns where session=%s", (session,))
        ).fetchone()
    assert len(text) <= memory.MAX_SUMMARY_CHARS
    assert kept is not None and kept[0] <= memory.MAX_TURNS
    assert "Earlier:" in text


async def test_fold_text_is_exact(db_pool: AsyncConnectionPool) -> None:
    """The fold (one SQL statement) writes the summary the Python formula it replaced wrote:
    oldest first, each turn ``role: content[:120]``, joined by `` | ``, appended to the
    previous summary, kept to its last ``MAX_SUMMARY_CHARS`` characters (multi-byte
    characters count as one, as in Python)."""
    session = f"s-{uuid.uuid4().hex[:8]}"
    turns: list[tuple[str, str]] = []
    expected = ""
    async with db_pool.connection() as conn:
        for i in range(memory.MAX_TURNS // 2 + 25):
            q, a = f"frage {i} ü€😀 " * (i % 13), f"answer {i} " + "é" * 130
            await memory.save(conn, "acme", session, f"wf-{session}-{i}", q, a)
            turns += [("user", q), ("assistant", a)]
            old, turns = turns[: max(0, len(turns) - memory.MAX_TURNS)], turns[-memory.MAX_TURNS :]
            if old:
                folded = " | ".join(f"{r}: {c[:120]}" for r, c in old)
                expected = (((expected + " | ") if expected else "") + folded)[-memory.MAX_SUMMARY_CHARS :]
        row = await (
            await conn.execute(
                "select summary, turns from memory_summaries where tenant='acme' and owner='' and session=%s",
                (session,),
            )
        ).fetchone()
    assert row is not None
    assert row[0] == expected
    assert row[1] == 2 * (memory.MAX_TURNS // 2 + 25) - memory.MAX_TURNS
