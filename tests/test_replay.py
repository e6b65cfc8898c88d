"""Determinism: replay every workflow shape, fresh from the server and from golden histories.

``test_fresh_histories_replay`` runs one workflow of each shape (worker cache 0, so every
task already replays from history while it runs), fetches the histories and replays them
with ``Replayer``. ``test_golden_histories_replay`` replays the histories committed in
``tests/histories/``: a change to ``AgentWorkflow`` that would break runs in flight fails it.
Re-record deliberately (after an intentional, versioned change) with

    KEEL_RECORD_HISTORIES=1 .venv/bin/pytest tests/test_replay.py -k fresh
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from activities.tools.testing import step
from keel.models import Approval, StepState
from keel.settings import Settings
from tests.helpers import make_order, request
from tests.scripted import plan, scripted_worker, start, wait_status, write_policy
from workflows.agent import AgentWorkflow

HISTORIES = Path(__file__).parent / "histories"
SHAPES = (
    "demo_refund",
    "approved",
    "rejected_compensated",
    "cancelled_mid_step",
    "deadline",
    "fallback",
    "error_cascade",
)


def _replayer() -> Replayer:
    return Replayer(workflows=[AgentWorkflow], data_converter=pydantic_data_converter)


async def _record_shapes(
    client: Client,
    pool: AsyncConnectionPool,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, WorkflowHistory]:
    order = await make_order(pool, total_usd=40.0)
    scripts = {
        "demo_refund": None,  # the real offline planner
        "approved": [plan(step("s1", "test_effect", note="approve-me"))],
        "rejected_compensated": [
            plan(step("s1", "test_effect", note="first"), step("s2", "test_effect", note="approve-me"))
        ],
        "cancelled_mid_step": [
            plan(step("s1", "test_effect", note="first"), step("s2", "slow_step", seconds=30))
        ],
        "deadline": [plan(step("s1", "slow_step", seconds=30))],
        "fallback": [plan(step("s1", "fragile_fetch", key="k"))],
        "error_cascade": [plan(*(step(f"s{i}", "always_fail", note=f"n{i}") for i in range(1, 5)))],
    }
    plans_by_message = {f"shape {name}": p for name, p in scripts.items() if p is not None}

    def script(inp):  # one planner for all shapes, chosen by the request's message
        return plans_by_message[inp.message][min(inp.iteration, 1) - 1]

    histories: dict[str, WorkflowHistory] = {}
    async with scripted_worker(
        client, pool, settings, task_queue, [], policy_file=write_policy(tmp_path), monkeypatch=monkeypatch
    ) as p:
        p._script = script
        for name in SHAPES:
            if name == "demo_refund":
                req = request(
                    f"Refund order {order} and e-mail the customer", request_id=f"replay-{name}-{os.getpid()}"
                )
            else:
                req = request(
                    f"shape {name}",
                    request_id=f"replay-{name}-{os.getpid()}",
                    deadline_seconds=2 if name == "deadline" else None,
                )
            if name == "demo_refund":  # route this one to the real planner
                p._script = _with_real(script)
            handle = await start(client, task_queue, req)
            if name in ("approved", "rejected_compensated"):
                sid = "s1" if name == "approved" else "s2"
                await wait_status(handle, sid, StepState.WAITING_APPROVAL)
                await handle.execute_update("approve", Approval(approve=name == "approved"))
            if name == "cancelled_mid_step":
                await wait_status(handle, "s2", StepState.RUNNING)
                await handle.execute_update("cancel", "replay test")
            resp = await handle.result()
            expected = {
                "demo_refund": "completed",
                "approved": "completed",
                "rejected_compensated": "rejected",
                "cancelled_mid_step": "cancelled",
                "deadline": "escape_hatch",
                "fallback": "completed",
                "error_cascade": "escape_hatch",
            }[name]
            assert resp.outcome == expected, (name, resp)
            histories[name] = await handle.fetch_history()
            p._script = script
    return histories


def _with_real(script):
    from activities.models.offline import offline_plan
    from keel.models import Plan

    def both(inp):
        if inp.message.startswith("shape "):
            return script(inp)
        executed = [{"tool": r.tool, "data": r.result, "state": r.state.value} for r in inp.executed]
        return Plan.model_validate(offline_plan(inp.message, {t.name for t in inp.tools}, executed))

    return both


async def test_fresh_histories_replay(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    histories = await _record_shapes(client, db_pool, temporal_services, task_queue, tmp_path, monkeypatch)
    replayer = _replayer()
    for history in histories.values():
        await replayer.replay_workflow(history)  # raises on any nondeterminism
    if os.environ.get("KEEL_RECORD_HISTORIES") == "1":
        HISTORIES.mkdir(exist_ok=True)
        for name, history in histories.items():
            (HISTORIES / f"{name}.json").write_text(history.to_json())


@pytest.mark.parametrize("shape", SHAPES)
async def test_golden_histories_replay(shape: str) -> None:
    path = HISTORIES / f"{shape}.json"
    assert path.exists(), f"missing golden history {path}; record it (see module docstring)"
    history = WorkflowHistory.from_json(f"golden-{shape}", path.read_text())
    await _replayer().replay_workflow(history)
