"""AgentWorkflow end to end on the real dev server and PostgreSQL (no mocks)."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from keel.models import StepState
from keel.settings import Settings
from tests.helpers import make_order, request, run_agent, running_worker


async def test_demo_request_refunds_exactly_once(
    client: Client, db_pool: AsyncConnectionPool, temporal_services: Settings, task_queue: str
) -> None:
    order = await make_order(db_pool, total_usd=42.5)
    req = request(f"Check if order {order} is shipped and refund it if so")
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, req)
    assert resp.outcome == "completed", resp
    assert [s.tool for s in resp.steps] == ["lookup_order", "issue_refund"]
    assert all(s.state == StepState.SUCCEEDED for s in resp.steps)
    assert "offline" in resp.model_label
    assert resp.spend.total_micros > 0 and resp.spend.by_tool["issue_refund"] == 2000
    async with db_pool.connection() as conn:
        rows = await (
            await conn.execute(
                "select amount_micros from refunds where idempotency_key like %s", (f"{resp.workflow_id}/%",)
            )
        ).fetchall()
    assert rows == [(42_500_000,)]


async def test_conditional_refund_skipped_when_not_shipped(
    client: Client, db_pool: AsyncConnectionPool, temporal_services: Settings, task_queue: str
) -> None:
    order = await make_order(db_pool, status="processing")
    req = request(f"Check if order {order} is shipped and refund it if so")
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, req)
    assert resp.outcome == "completed"
    assert [s.state for s in resp.steps] == [StepState.SUCCEEDED, StepState.SKIPPED]
    assert "processing" in resp.message
