"""The sandboxed tools inside real runs: the refund report, and hostile snippets in a plan.

Real dev server, real PostgreSQL, the real ``run_tool`` activity (gate, budget, audit,
exactly-once) and real bubblewrap children. Skipped, with the reason, where bubblewrap
cannot run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from keel.activities.sandbox import sandbox_available
from keel.models import StepState
from keel.settings import Settings
from tests.doubles import tools as testing
from tests.doubles.models import step
from tests.helpers import make_order, request, run_agent, running_worker
from tests.scripted import plan, scripted_worker, start

_OK, _WHY = sandbox_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"sandbox unavailable here: {_WHY}")


async def _expected_report(pool: AsyncConnectionPool) -> tuple[int, float]:
    async with pool.connection() as conn:
        row = await (
            await conn.execute(
                "select count(*), coalesce(sum(case when o.status in ('shipped','delivered') "
                "then greatest(o.total_micros - coalesce(r.done, 0), 0) else 0 end), 0) "
                "from orders o left join (select order_id, sum(amount_micros) done from refunds "
                "where status='issued' group by order_id) r on r.order_id = o.id where o.tenant='acme'"
            )
        ).fetchone()
    assert row is not None
    return int(row[0]), round(int(row[1]) / 1e6, 2)


async def test_the_planner_computes_a_refund_report_in_the_sandbox(
    client: Client, db_pool: AsyncConnectionPool, temporal_services: Settings
) -> None:
    await make_order(db_pool, total_usd=12.34)
    orders, refundable = await _expected_report(db_pool)
    task_queue = f"report-{uuid.uuid4().hex[:8]}"
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, request("compute a refund report for acme's orders"))
        denied = await run_agent(
            client, task_queue, request("compute a refund report for acme's orders", user="bob")
        )
    assert resp.outcome == "completed", resp
    assert [(s.tool, s.state) for s in resp.steps] == [("run_python", StepState.SUCCEEDED)]
    data = resp.steps[0].result or {}
    assert data["exit_code"] == 0 and data["status"] == "ok"
    assert data["cpu_seconds"] >= 0 and data["max_rss_kb"] > 0 and data["wall_seconds"] > 0
    assert data["output"]["orders"] == orders
    assert data["output"]["refundable_usd"] == pytest.approx(refundable, abs=0.01)
    assert f"Refund report: {orders} orders" in resp.message, resp.message
    assert resp.spend.by_tool["run_python"] == 500
    # Exactly once: the effect is recorded under the step's key, with the same result.
    async with db_pool.connection() as conn:
        rows = await (
            await conn.execute(
                "select tool from tool_effects where idempotency_key = %s", (f"{resp.workflow_id}/s1",)
            )
        ).fetchall()
        audit = await (
            await conn.execute(
                "select decision from audit_log "
                "where workflow_id=%s and kind='permission' and subject='run_python'",
                (resp.workflow_id,),
            )
        ).fetchall()
    assert rows == [("run_python",)] and audit == [("allow",)]
    # bob (viewer) does not hold code:run: the tool is not even offered to the planner.
    assert denied.steps == () and "run_python" in denied.message


def _policy(tmp_path: Path) -> Path:
    text = testing.policy_yaml().replace("email:send]", "email:send, code:run, command:run]")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


async def test_hostile_snippets_in_a_plan_fail_their_step_and_leak_nothing(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEEL_TEST_WORKER_SECRET", "do-not-leak-7731")
    snoop = (
        "import os\nprint(sorted(os.environ))\n"
        "print(open('/proc/1/environ').read())\n"
        "print([p for p in ('/work', '/root', '/etc/passwd') if os.path.exists(p)])"
    )
    plans = [
        plan(
            step("s1", "run_python", code=snoop),
            step("s2", "run_python", code="import socket\nsocket.create_connection(('127.0.0.1', 5432), 2)"),
            step("s3", "run_command", argv=["sh", "-c", "cat /etc/passwd"]),
            step("s4", "run_command", argv=["wc", "-l", "input.txt"], stdin_text="a\nb\nc\n"),
        )
    ]
    task_queue = f"hostile-{uuid.uuid4().hex[:8]}"
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        plans,
        policy_file=_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        resp = await (await start(client, task_queue)).result()
    by_id = {s.id: s for s in resp.steps}
    out = (by_id["s1"].result or {}).get("stdout", "")
    assert by_id["s1"].state == StepState.SUCCEEDED, by_id["s1"]
    assert "do-not-leak-7731" not in out and "KEEL_" not in out and "[]" in out, out
    assert os.environ["KEEL_TEST_WORKER_SECRET"] == "do-not-leak-7731"
    assert by_id["s2"].state == StepState.FAILED and "ConnectionRefused" in by_id["s2"].error, by_id["s2"]
    assert by_id["s3"].state == StepState.FAILED and "not allowed" in by_id["s3"].error, by_id["s3"]
    s4 = by_id["s4"].result or {}
    assert by_id["s4"].state == StepState.SUCCEEDED and s4["stdout"].strip() == "3 input.txt", s4
