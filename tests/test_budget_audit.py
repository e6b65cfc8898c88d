"""Issue 17: budget decisions that change a run each leave one audit row with rule and reason.

Caps applied (a call moved to a cheaper tier, or cut to the output the grant pays for), an
optional step skipped because caps switch optional steps off, and an observe-mode scope's
would-be denial (recorded, not enforced). Real worker, real ledger, the offline model; each
row is read back from the chain, rendered by ``keel audit show`` and the chain verifies.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from keel.activities import audit, ledger
from keel.settings import Settings
from tests.helpers import make_order, request, run_agent, running_worker

ROOT = Path(__file__).parent.parent


def _show(env: dict[str, str], workflow_id: str) -> str:
    done = subprocess.run(
        [sys.executable, "starter.py", "audit", "show", workflow_id],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def _budget_rows(pool: AsyncConnectionPool, workflow_id: str) -> list[Any]:
    async with pool.connection() as conn:
        rows = [r for r in await audit.trail(conn, workflow_id) if r.kind == "budget"]
        assert (await audit.verify(conn, "acme")).ok
    return rows


async def _headroom(pool: AsyncConnectionPool, scope: str, left_micros: int, observe: bool = False) -> None:
    """Give ``scope`` a limit that leaves ``left_micros`` above what it has spent and holds."""
    async with pool.connection() as conn:
        row = await (
            await conn.execute(
                "select spent_micros + reserved_micros from keel_budget_scopes where scope=%s", (scope,)
            )
        ).fetchone()
        await ledger.set_limit(conn, scope, (row[0] if row else 0) + left_micros, observe)


async def _clear(pool: AsyncConnectionPool, scope: str) -> None:
    async with pool.connection() as conn:
        await ledger.set_limit(conn, scope, None)


async def test_a_tier_cap_is_one_audit_row_with_rule_and_reason(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    test_env: dict[str, str],
) -> None:
    order = await make_order(db_pool)
    req = request(
        f"Is order {order} shipped?",
        max_budget_usd=0.00095,  # granted, but little headroom left: the ledger caps the tier
        model_policy={"min_tier": "balanced", "max_tier": "powerful"},
    )
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, req)
    assert "capped_to_fast" in resp.flags and resp.outcome == "completed", (resp.flags, resp.reason)
    rows = await _budget_rows(db_pool, resp.workflow_id)
    capped = [r for r in rows if r.decision == "capped_tier"]
    assert len(capped) == 1, rows
    assert capped[0].data["rule"] == "budget-caps" and capped[0].data["to_tier"] == "fast"
    assert "capped from tier balanced to fast" in capped[0].reason, capped[0].reason
    shown = _show(test_env, resp.workflow_id)
    assert "capped_tier" in shown and "rule=budget-caps" in shown, shown


async def test_an_optional_step_skipped_for_budget_is_audited(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    test_env: dict[str, str],
) -> None:
    """The tool's own scope gets a limit that its one call leaves under the low-water mark:
    the ledger answers ALLOW_WITH_CAPS with optional steps off, and ``check_inventory`` is
    optional, so it is skipped: one ``skipped_optional`` row."""
    scope = "acme/tool:check_inventory"
    await _headroom(db_pool, scope, 110)  # a call holds 100 µUSD; 10 left is under 20 %
    try:
        async with running_worker(client, db_pool, temporal_services, task_queue):
            resp = await run_agent(client, task_queue, request("How many SKU-KEEL-1 are in stock?"))
    finally:
        await _clear(db_pool, scope)
    step = next(s for s in resp.steps if s.tool == "check_inventory")
    assert step.state.value == "skipped", step
    rows = await _budget_rows(db_pool, resp.workflow_id)
    skipped = [r for r in rows if r.decision == "skipped_optional"]
    assert [(r.subject, r.data["rule"], r.step_id) for r in skipped] == [
        ("check_inventory", "budget-caps", step.id)
    ], rows
    assert "optional step check_inventory skipped" in skipped[0].reason
    shown = _show(test_env, resp.workflow_id)
    assert "skipped_optional" in shown and "rule=budget-caps" in shown, shown


async def test_an_observe_mode_would_be_denial_is_audited_and_not_enforced(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    test_env: dict[str, str],
) -> None:
    order = await make_order(db_pool)
    scope = "acme/tool:lookup_order"
    await _headroom(db_pool, scope, 0, observe=True)  # enforced, it would deny every lookup
    try:
        async with running_worker(client, db_pool, temporal_services, task_queue):
            resp = await run_agent(client, task_queue, request(f"Is order {order} shipped?"))
    finally:
        await _clear(db_pool, scope)
    assert resp.outcome == "completed", resp.reason  # observe mode decides nothing
    rows = await _budget_rows(db_pool, resp.workflow_id)
    would = [r for r in rows if r.decision == "would_deny"]
    assert [(r.subject, r.data["rule"], r.data["enforced"]) for r in would] == [
        ("lookup_order", "observe-mode", "ALLOW")
    ], rows
    assert "observe: would be DENY" in would[0].reason, would[0].reason
    shown = _show(test_env, resp.workflow_id)
    assert "would_deny" in shown and "rule=observe-mode" in shown, shown
