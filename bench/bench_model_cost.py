"""What the model judge and the model-written answer cost per run on the offline path: zero.

With no provider key the evaluator judges by rules only and the final message is the
deterministic summary, so a run's only model calls are its plans. This runs the demo task
(lookup_order → issue_refund → send_email, the real offline planner, real tools) through the
real worker and reports, per run, each role's model calls and micro-USD from the response's
call records, and checks them against the ledger's model holds for the run.
"""

from __future__ import annotations

import uuid
from typing import Any

from bench.common import DEMO_TASK, fresh_order, keel_worker

__all__ = ["run"]

ROLES = ("plan", "check", "evaluate", "respond")


async def run(client: Any, pool: Any, settings: Any, *, smoke: bool = False) -> dict[str, Any]:
    from keel.models import AgentRequest, AgentResponse

    runs = 2 if smoke else 10
    tq = f"bench-cost-{uuid.uuid4().hex[:8]}"
    per_role: dict[str, dict[str, list[int]]] = {r: {"calls": [], "micros": []} for r in ROLES}
    ledger_equal, outcomes = 0, []
    async with keel_worker(client, pool, settings, tq):
        for _ in range(runs):
            order = await fresh_order(pool)
            req = AgentRequest(
                tenant="bench",
                user="bench",
                message=DEMO_TASK.format(order=order),
                request_id=f"c-{uuid.uuid4().hex[:12]}",
                max_budget_usd=5.0,
            )
            resp: AgentResponse = await client.execute_workflow(
                "AgentWorkflow",
                req,
                id=f"agent/bench/{req.request_id}",
                task_queue=tq,
                result_type=AgentResponse,
            )
            outcomes.append(resp.outcome)
            for role in ROLES:
                mine = [c for c in resp.calls if c.role == role]
                per_role[role]["calls"].append(len(mine))
                per_role[role]["micros"].append(sum(c.cost_micros for c in mine))
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "select coalesce(sum(actual_micros), 0) from keel_budget_reservations"
                    " where run_id = %s and kind = 'model' and status = 'committed'",
                    (resp.workflow_id,),
                )
                row = await cur.fetchone()
            ledger_equal += int(row is not None and int(row[0]) == sum(resp.spend.by_model.values()))
    summary = {
        role: {
            "calls_per_run": sum(v["calls"]) / runs,
            "micros_per_run": sum(v["micros"]) / runs,
            "max_micros": max(v["micros"]),
        }
        for role, v in per_role.items()
    }
    judge_answer = sum(summary[r]["micros_per_run"] for r in ("check", "evaluate", "respond"))
    return {
        "runs": runs,
        "outcomes": sorted(set(outcomes)),
        "per_role": summary,
        "judge_and_answer_micros_per_run": judge_answer,
        "runs_where_spend_equals_ledger": ledger_equal,
        "markdown": _markdown(runs, summary, judge_answer, ledger_equal, sorted(set(outcomes))),
    }


def _markdown(
    runs: int, summary: dict[str, Any], judge_answer: float, equal: int, outcomes: list[str]
) -> str:
    rows = [
        f"| {role} | {s['calls_per_run']:.2f} | {s['micros_per_run']:.1f} | {s['max_micros']} |"
        for role, s in summary.items()
    ]
    return "\n".join(
        [
            f"Offline path, demo task, {runs} runs (outcomes: {', '.join(outcomes)}).",
            "",
            "| role | model calls / run | micro-USD / run | max micro-USD |",
            "| --- | ---: | ---: | ---: |",
            *rows,
            "",
            f"Judge (check + evaluate) and answer: **{judge_answer:.1f} micro-USD per run**; the run's "
            f"spend report equalled the ledger's model holds in {equal} of {runs} runs.",
        ]
    )
