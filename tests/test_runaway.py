"""The runaway demo: an agent that would loop forever is stopped by its budget, exactly.

The request asks the agent to keep watching an order that never ships; with every other
escape hatch opened wide, only the ledger stands between it and an endless bill. The same
loop without the ledger (a naive read-then-write counter under concurrency) overspends: see
``tests/test_ledger_concurrency.py::test_naive_counter_overspends_where_ledger_does_not``.
"""

from __future__ import annotations

from pathlib import Path

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from keel.activities import ledger
from keel.budget import scope_path
from keel.settings import Settings
from tests.helpers import make_order, request, run_agent, running_worker

BUDGET_USD = 0.004


def _wide_open_policy(tmp_path: Path) -> Path:
    text = (Path(__file__).parent.parent / "config" / "policy.yaml").read_text()
    text = text.replace("max_iterations: 3", "max_iterations: 100000")
    text = text.replace("max_tool_calls: 12", "max_tool_calls: 100000")
    text = text.replace("thrash_repeats: 3", "thrash_repeats: 100000")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


async def test_looping_agent_stops_at_its_budget_with_exact_spend(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Path,
) -> None:
    order = await make_order(db_pool, status="processing")
    req = request(f"Keep checking order {order} until it ships", max_budget_usd=BUDGET_USD)
    async with running_worker(
        client, db_pool, temporal_services, task_queue, policy_file=_wide_open_policy(tmp_path)
    ):
        resp = await run_agent(client, task_queue, req)
    assert resp.outcome == "budget_exhausted", (resp.outcome, resp.reason)
    assert resp.iterations > 5  # it really looped
    limit = int(BUDGET_USD * 1_000_000)
    async with db_pool.connection() as conn:
        run_scope = await ledger.show(conn, scope_path("acme", "default", "alice", resp.workflow_id)[-1])
        violations = await ledger.check_invariant(conn)
    assert [v for v in violations if resp.workflow_id in v] == []
    assert run_scope is not None, resp.iterations
    # The ledger's account and the run's own account agree to the micro-dollar.
    assert run_scope.spent_micros == resp.spend.total_micros
    assert run_scope.spent_micros <= limit and run_scope.reserved_micros == 0
    assert "budget" in resp.reason
