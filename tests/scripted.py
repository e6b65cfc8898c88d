"""Workflow-logic test harness: a worker whose model plans what the test scripts.

Everything else is real: the dev server, PostgreSQL, the ``plan`` activity and its metering
(the scripted model, ``tests.doubles.models``, sits behind the provider seam), the gate, the
ledger, the tool activity and the test tools (``tests.doubles.tools``, served through
``KEEL_TOOL_MODULES`` like any tool package).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from keel.models import AgentRequest, AgentResponse, Plan, PlanStep, RunStatus, StepState
from keel.settings import Settings
from tests.doubles import tools as testing
from tests.doubles.models import PlanCall, ScriptedPlanner
from tests.helpers import request, running_worker

__all__ = [
    "effects_of",
    "plan",
    "scripted_worker",
    "serve_test_tools",
    "start",
    "wait_status",
    "write_policy",
]


def serve_test_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve the test tools on the workers this test starts (in-process or subprocesses)."""
    monkeypatch.setenv("KEEL_TOOL_MODULES", testing.MODULE)
    testing.register()


def plan(*steps: PlanStep, replan: bool = False, answer: str = "") -> Plan:
    return Plan(steps=tuple(steps), replan=replan, answer=answer)


def write_policy(tmp_path: Path, **kw: Any) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(testing.policy_yaml(**kw))
    return path


@contextlib.asynccontextmanager
async def scripted_worker(
    client: Client,
    pool: AsyncConnectionPool,
    settings: Settings,
    task_queue: str,
    plans: Sequence[Plan] | Callable[[PlanCall], Plan | None],
    *,
    policy_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    **kw: Any,
) -> AsyncIterator[ScriptedPlanner]:
    serve_test_tools(monkeypatch)
    planner = ScriptedPlanner(plans)
    with planner.serving():
        async with running_worker(client, pool, settings, task_queue, policy_file=policy_file, **kw):
            yield planner


async def start(
    client: Client, task_queue: str, req: AgentRequest | None = None, **kw: Any
) -> WorkflowHandle[Any, AgentResponse]:
    from keel.workflows.agent import TENANT, USER

    req = req or request("scripted test run", **kw)
    return await client.start_workflow(
        "AgentWorkflow",
        req,
        id=f"agent/{req.tenant}/{req.request_id}",
        task_queue=task_queue,
        result_type=AgentResponse,
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(TENANT, req.tenant), SearchAttributePair(USER, req.user)]
        ),
    )


async def wait_status(
    handle: WorkflowHandle[Any, Any], step_id: str, state: StepState, within: float = 20.0
) -> RunStatus:
    """Poll the ``status`` query until ``step_id`` is in ``state``."""
    deadline = time.monotonic() + within
    last: RunStatus | None = None
    while time.monotonic() < deadline:
        last = await handle.query("status", result_type=RunStatus)
        if any(s.id == step_id and s.state == state for s in last.steps):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{step_id} never reached {state.value}; last status: {last}")


async def effects_of(pool: AsyncConnectionPool, workflow_id: str) -> list[tuple[Any, ...]]:
    """``(step_id, tool, note, status)`` of the run's test effects, in creation order."""
    async with pool.connection() as conn:
        rows = await (
            await conn.execute(
                "select idempotency_key, tool, note, status from test_effects "
                "where idempotency_key like %s order by id",
                (f"{workflow_id}/%",),
            )
        ).fetchall()
    return [(k.rsplit("/", 1)[1], t, n, s) for k, t, n, s in rows]
