"""One hold per model call, numbered from the ledger: what a Temporal retry, a dead attempt
and an empty budget do to the numbering and the bill (real ledger, the offline model)."""

from __future__ import annotations

import uuid

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities import ledger
from keel.activities.agent import AgentActivities
from keel.activities.metered import Meter, estimate_input_tokens
from keel.agent_io import ModelCallsInput
from keel.budget import OpenRunRequest, ReserveRequest, scope_path
from keel.models import ChatMessage, ModelCall
from keel.settings import Settings
from tests.providers.sloppy import ledger_model_rows

CALL = ModelCall(
    model="offline",
    role="plan",
    messages=(ChatMessage(role="user", content="REQUEST: Where is order ORD-1?"),),
    tools_doc=({"name": "lookup_order", "description": "find an order"},),
)


async def _run_scopes(pool: AsyncConnectionPool, limit: int | None = None) -> tuple[str, tuple[str, ...]]:
    wid = f"agent/acme/m-{uuid.uuid4().hex[:10]}"
    scopes = scope_path("acme", "default", "alice", wid)
    async with pool.connection() as conn:
        await ledger.open_run(conn, OpenRunRequest(scopes=scopes, run_limit_micros=limit))
    return wid, scopes


async def test_a_retried_activity_continues_the_numbering_and_settles_a_dead_attempt(
    db_pool: AsyncConnectionPool,
) -> None:
    wid, scopes = await _run_scopes(db_pool)
    env = ActivityEnvironment()
    first = Meter(db_pool, prefix=f"{wid}/plan1", scopes=scopes, tier="fast")
    await env.run(first.call, CALL)
    await env.run(first.call, CALL)
    # A later attempt died after reserving call3 (worker killed mid-request).
    async with db_pool.connection() as conn:
        await ledger.reserve(
            conn,
            ReserveRequest(
                key=f"{wid}/plan1/call3", scopes=scopes, amount_micros=500, subject="offline", run_id=wid
            ),
        )
    retry = Meter(db_pool, prefix=f"{wid}/plan1", scopes=scopes, tier="fast")
    await env.run(retry.call, CALL)
    rows = await ledger_model_rows(db_pool, wid)
    assert [r[0].rsplit("/", 1)[1] for r in rows] == ["call1", "call2", "call3", "call4"]
    assert all(r[1] == "committed" for r in rows)
    assert rows[2][2] == 500  # the dead attempt's hold, charged in full: usage never came
    # The retry reports the whole step, earlier attempts included: equal to the ledger.
    assert retry.report.cost_micros == sum(r[2] for r in rows)
    assert [c.key.rsplit("/", 1)[1] for c in retry.report.calls] == ["call1", "call2", "call3", "call4"]
    async with db_pool.connection() as conn:
        cur = await conn.execute(
            "select scopes from keel_budget_reservations where key = %s", (f"{wid}/plan1/call4",)
        )
        row = await cur.fetchone()
    assert row is not None and "acme/model:offline" in row[0]


async def test_a_denied_hold_sends_nothing(db_pool: AsyncConnectionPool) -> None:
    wid, scopes = await _run_scopes(db_pool, limit=1)
    meter = Meter(db_pool, prefix=f"{wid}/plan1", scopes=scopes, tier="fast")
    with pytest.raises(ApplicationError) as info:
        await ActivityEnvironment().run(meter.call, CALL)
    assert info.value.type == "BudgetDenied" and info.value.non_retryable
    assert "budget denied the plan call to offline" in info.value.message
    rows = await ledger_model_rows(db_pool, wid)
    assert [r[1] for r in rows] == ["denied"] and meter.report.cost_micros == 0


def test_input_estimate_covers_the_prompt() -> None:
    big = CALL.model_copy(update={"system": "x" * 3000})
    assert estimate_input_tokens(big) >= 1000 > estimate_input_tokens(CALL)


async def test_settling_a_step_that_died_without_a_report(
    db_pool: AsyncConnectionPool, settings: Settings
) -> None:
    """The workflow's fallback when a model activity timed out: the ledger is the report."""
    wid, scopes = await _run_scopes(db_pool)
    env = ActivityEnvironment()
    await env.run(Meter(db_pool, prefix=f"{wid}/eval2", scopes=scopes).call, CALL)
    async with db_pool.connection() as conn:
        await ledger.reserve(
            conn,
            ReserveRequest(
                key=f"{wid}/eval2/call2", scopes=scopes, amount_micros=700, subject="offline", run_id=wid
            ),
        )
    out = await env.run(
        AgentActivities(db_pool, settings).settle_model_calls, ModelCallsInput(prefix=f"{wid}/eval2")
    )
    rows = await ledger_model_rows(db_pool, wid)
    assert [r[1] for r in rows] == ["committed", "committed"] and rows[1][2] == 700
    assert out.cost_micros == sum(r[2] for r in rows) and len(out.calls) == 2
    assert [c.role for c in out.calls] == ["evaluate", "evaluate"]


async def test_the_runs_model_call_cap_binds_on_real_calls(db_pool: AsyncConnectionPool) -> None:
    wid, scopes = await _run_scopes(db_pool)
    env = ActivityEnvironment()
    meter = Meter(db_pool, prefix=f"{wid}/plan3", scopes=scopes, max_calls=1)
    await env.run(meter.call, CALL)
    with pytest.raises(ApplicationError) as info:
        await env.run(meter.call, CALL)
    assert info.value.type == "BudgetDenied" and "cap on model calls" in info.value.message
    assert len(await ledger_model_rows(db_pool, wid)) == 1  # nothing held for the refused call
