"""A worker SIGKILLed after ``begin_local`` has finished but before its workflow task
completed (here: while the same task's next local activity, ``budget_admit``, waits on a
row lock). A local activity's result becomes durable only when its workflow task
completes, so the next worker runs ``begin_local`` again from the start: preparation again
(idempotent) and the first plan again, a second model call for the same plan. The
``begin_run`` activity's result was durable the moment it completed.

That second call is the price of the in-process beginning, and it is accounted: the offline
plan is deterministic (the same plan), both calls are committed in the ledger and both are
in the run's report. Checked: one authorization and one finish row, no slot, one refund,
spend equals the ledger (both calls in it), and no hold left open.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from temporalio.client import Client

from bench.bench_recovery import start_worker, wait_polling, worker_environment
from keel.activities import ledger
from keel.budget import scope_path
from keel.models import AgentResponse
from keel.settings import Settings
from tests.helpers import request
from tests.scripted import start
from tests.test_attack_lean_kill import _order


async def _wait_lock_waiter(url: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = await (
                await conn.execute(
                    "select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
                    "and pid <> pg_backend_pid()"
                )
            ).fetchone()
            if row and row[0]:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("budget_admit never waited on the held reservation key")


@pytest.mark.slow  # two real worker processes, ~12 s: `make test-slow` (the suite's 10-minute budget)
@pytest.mark.timeout(120)
async def test_sigkill_after_begin_local_before_its_task_completes_plans_once(
    client: Client,
    temporal_services: Settings,
    pg_url: str,
    test_env: dict[str, str],
    tmp_path: Path,
) -> None:
    tenant = "acme"
    queue = f"local-kill-{uuid.uuid4().hex[:8]}"
    env = worker_environment(temporal_services, queue, test_env)
    order = await _order(pg_url, tenant)
    req = request(f"Refund order {order} and e-mail the customer", tenant=tenant)
    wid = f"agent/{tenant}/{req.request_id}"
    first = start_worker(env, tmp_path, "first")
    second = None
    holder = await psycopg.AsyncConnection.connect(pg_url)
    try:
        await wait_polling(client, queue, first, within=90)
        # Take the plan's admission keys (uncommitted): budget_admit's insert waits on them.
        for i in (1, 2, 3):
            await holder.execute(
                "insert into keel_budget_reservations (key, scopes, requested_micros, amount_micros,"
                " status, expires_at, kind, decision, caps, answer, payload_hash)"
                " values (%s, array[%s], 0, 0, 'held', now() + interval '1 hour', 'tool', 'ALLOW',"
                " '{}'::jsonb, '{}'::jsonb, 'x')",
                (f"{wid}/s{i}/reserve", tenant),
            )
        handle = await start(client, queue, req)
        await _wait_lock_waiter(pg_url)
        first.kill()
        await holder.rollback()
        second = start_worker(env, tmp_path, "second")
        await wait_polling(client, queue, second, within=90)
        resp: AgentResponse = await asyncio.wait_for(handle.result(), timeout=90)
    finally:
        await holder.close()
        first.stop()
        if second is not None:
            second.stop()
    assert resp.outcome == "completed", (resp.outcome, resp.reason)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        keys = [
            r[0]
            for r in await (
                await conn.execute(
                    "select idem_key from audit_log where workflow_id=%s and kind='run' order by seq", (wid,)
                )
            ).fetchall()
        ]
        (slots,) = await (
            await conn.execute("select count(*) from run_slots where workflow_id=%s", (wid,))
        ).fetchone()  # type: ignore[misc]
        (refunds,) = await (
            await conn.execute("select count(*) from refunds where idempotency_key like %s", (wid + "/%",))
        ).fetchone()  # type: ignore[misc]
        plan_calls = [
            r[0]
            for r in await (
                await conn.execute(
                    "select key from keel_budget_reservations where key like %s order by key",
                    (wid + "/plan1/%",),
                )
            ).fetchall()
        ]
        view = await ledger.show(conn, scope_path(tenant, "default", "alice", wid)[-1])
    assert keys == [f"{wid}/authorize", f"{wid}/finish"], keys
    assert slots == 0 and refunds == 1, (slots, refunds)
    assert view is not None and view.spent_micros == resp.spend.total_micros and view.reserved_micros == 0
    # The dead worker's call and the repeat: both committed, both in the run's report.
    assert plan_calls == [f"{wid}/plan1/call1", f"{wid}/plan1/call2"], plan_calls
    assert {c.key for c in resp.calls} >= set(plan_calls), resp.calls
