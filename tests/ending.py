"""What "the run ended through the one exit" means, checked against the durable stores.

Shared by the adversarial tests (boundaries, gate property, request ids, failure after an
effect): each asks PostgreSQL and Temporal, never the run's own word, whether the ending
happened — the finish audit row, the run slot, the open holds, spend against the ledger.
"""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle

from bench.bench_recovery import relevant_violations
from keel.activities.ledger import check_invariant
from keel.models import AgentResponse

__all__ = ["assert_nothing_started", "assert_one_exit", "history_counts", "ledger_facts"]


async def ledger_facts(pool: AsyncConnectionPool, workflow_id: str) -> dict[str, Any]:
    """The durable facts of one run: slot, holds, committed spend, audit rows, effects."""
    async with pool.connection() as conn:

        async def one(sql: str, *args: Any) -> Any:
            row = await (await conn.execute(sql, args)).fetchone()
            assert row is not None
            return row[0]

        return {
            "slot": await one("select count(*) from run_slots where workflow_id = %s", workflow_id),
            "held": await one(
                "select count(*) from keel_budget_reservations where run_id = %s and status = 'held'",
                workflow_id,
            ),
            "reservations": await one(
                "select count(*) from keel_budget_reservations where run_id = %s", workflow_id
            ),
            "committed_micros": await one(
                "select coalesce(sum(actual_micros), 0) from keel_budget_reservations "
                "where run_id = %s and status = 'committed'",
                workflow_id,
            ),
            "audit": await one("select count(*) from audit_log where workflow_id = %s", workflow_id),
            "finish": await one("select decision from audit_log where idem_key = %s", f"{workflow_id}/finish")
            if await one("select count(*) from audit_log where idem_key = %s", f"{workflow_id}/finish")
            else None,
            "effects": await one(
                "select count(*) from tool_effects where idempotency_key like %s", f"{workflow_id}/%"
            ),
            "violations": relevant_violations(await check_invariant(conn), [workflow_id]),
        }


async def history_counts(handle: WorkflowHandle[Any, Any]) -> dict[str, int]:
    """How many events of each type the run's history holds (``WORKFLOW_TASK_FAILED`` ...)."""
    counts: dict[str, int] = {}
    async for event in handle.fetch_history_events():
        name = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")
        counts[name] = counts.get(name, 0) + 1
    return counts


async def assert_nothing_started(pool: AsyncConnectionPool, workflow_id: str) -> None:
    """No slot, no hold, no charge, no audit row, no effect under this run's id."""
    facts = await ledger_facts(pool, workflow_id)
    assert facts == {
        "slot": 0,
        "held": 0,
        "reservations": 0,
        "committed_micros": 0,
        "audit": 0,
        "finish": None,
        "effects": 0,
        "violations": [],
    }, facts


async def assert_one_exit(
    pool: AsyncConnectionPool, handle: WorkflowHandle[Any, Any], resp: AgentResponse
) -> dict[str, Any]:
    """The run went through ``_end``: finish row with its outcome, slot freed, no hold left
    open, spend reported equals the ledger's commits, invariant intact, no task-failure loop."""
    facts = await ledger_facts(pool, resp.workflow_id)
    assert facts["finish"] == resp.outcome, (facts, resp.outcome, resp.reason)
    assert facts["slot"] == 0, facts
    assert facts["held"] == 0, facts
    assert facts["violations"] == [], facts
    assert resp.spend.total_micros == facts["committed_micros"], (resp.spend, facts)
    counts = await history_counts(handle)
    assert counts.get("WORKFLOW_TASK_FAILED", 0) == 0, counts
    return facts
