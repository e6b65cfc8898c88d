"""Agents as definitions, and ``keel.Client`` end to end.

One worker serves several agents (support, operations, acme's Python-declared shipping
agent); each run gets its agent's instructions, tools and policy section; runs are found by
the ``KeelAgent`` search attribute and carry the agent in their id; the client starts,
follows, approves, cancels and reads runs against the real dev server and PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError
from temporalio.client import Client as TemporalClient

from keel.agents import Agent, AgentError, load_agents
from keel.client import Client, RefusedError, RunEvent, RunExistsError, RunNotFoundError
from keel.models import Plan, StepState
from keel.settings import PROJECT_ROOT, Settings
from tests.doubles.models import ScriptedPlanner
from tests.helpers import running_worker

KEEL = Path(sys.executable).parent / "keel"


def _client(temporal: TemporalClient, settings: Settings, task_queue: str) -> Client:
    import dataclasses

    return Client(temporal, dataclasses.replace(settings, task_queue=task_queue))


async def test_one_worker_serves_several_agents_each_with_its_instructions_and_tools(
    client: TemporalClient, db_pool: AsyncConnectionPool, temporal_services: Settings, task_queue: str
) -> None:
    planner = ScriptedPlanner([Plan(answer="noted")])
    keel = _client(client, temporal_services, task_queue)
    async with (
        planner.serving(),
        running_worker(
            client,
            db_pool,
            temporal_services,
            task_queue,
        ),
    ):
        ops = await keel.start("How is stock?", tenant="acme", user="carol", agent="operations")
        sup = await keel.start("How is my order?", tenant="acme", user="alice")
        # No order named: a zero-step "noted" plan for an actionable request is never "completed".
        ship = await keel.start(
            "What does the shipping desk handle?", tenant="acme", user="alice", agent="shipping"
        )
        results = [await r.result() for r in (ops, sup, ship)]
    assert [r.outcome for r in results] == ["completed"] * 3, results
    assert ops.workflow_id.startswith("agent/acme/operations/r-")
    assert sup.workflow_id.startswith("agent/acme/support/r-")
    seen = {call.workflow_id.split("/")[2]: call for call in planner.calls}
    assert seen["operations"].instructions.startswith("You are the planner of a warehouse-operations agent")
    assert {t.name for t in seen["operations"].tools} == {"check_inventory", "open_ticket"}
    assert seen["support"].instructions.startswith("You are the planner of a customer-support agent")
    assert {"lookup_order", "issue_refund", "send_email"} <= {t.name for t in seen["support"].tools}
    assert "open_ticket" not in {t.name for t in seen["support"].tools}  # alice lacks tickets:write
    # The Python-declared agent: its tag selection, minus what alice may not use.
    assert seen["shipping"].instructions.startswith("You are the planner of Acme's shipping desk")
    assert {t.name for t in seen["shipping"].tools} == {"lookup_order"}  # no shipments:write

    async def ids(agent: str) -> set[str]:
        query = f"KeelAgent = '{agent}' AND TaskQueue = '{task_queue}'"
        return {wf.id async for wf in client.list_workflows(query)}

    for _ in range(50):  # visibility is eventually consistent
        if await ids("operations") == {ops.workflow_id} and await ids("support") == {sup.workflow_id}:
            break
        await asyncio.sleep(0.2)
    assert await ids("operations") == {ops.workflow_id}
    assert await ids("support") == {sup.workflow_id}


async def test_operations_agent_end_to_end_with_the_offline_model_and_live_events(
    client: TemporalClient, db_pool: AsyncConnectionPool, temporal_services: Settings, task_queue: str
) -> None:
    keel = _client(client, temporal_services, task_queue)
    async with running_worker(client, db_pool, temporal_services, task_queue):
        run = await keel.start(
            "Is SKU-KEEL-2 in stock? Open a ticket if not", tenant="acme", user="carol", agent="operations"
        )
        events: list[RunEvent] = [e async for e in run.events(poll_seconds=0.05)]
        resp = await run.result()
        status = await run.status()
    assert resp.outcome == "completed", resp
    assert [(s.tool, s.state) for s in resp.steps] == [
        ("check_inventory", StepState.SUCCEEDED),
        ("open_ticket", StepState.SUCCEEDED),
    ]
    assert "Opened ticket #" in resp.message
    ticket = resp.steps[1].result["ticket_id"]  # type: ignore[index]
    async with db_pool.connection() as conn:
        rows = await (
            await conn.execute(
                "select id, sku, status from tickets where idempotency_key like %s", (f"{run.workflow_id}/%",)
            )
        ).fetchall()
    assert rows == [(ticket, "SKU-KEEL-2", "open")]
    async with db_pool.connection() as conn:  # memory: agent -> its own session key
        sessions = await (
            await conn.execute(
                "select distinct session from memory_turns where workflow_id=%s", (run.workflow_id,)
            )
        ).fetchall()
    assert sessions == [("operations:default",)]
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and events[-1].status.outcome == "completed"
    assert "phase" in kinds
    final_steps = [(e.step.id, e.step.state) for e in events if e.kind == "step" and e.step]
    assert ("s2", StepState.SUCCEEDED) in final_steps
    assert status is not None and status.phase == "done" and status.outcome == "completed"


async def test_agent_policy_section_needs_approval_and_the_client_approves_or_cancels(
    client: TemporalClient, db_pool: AsyncConnectionPool, temporal_services: Settings, task_queue: str
) -> None:
    keel = _client(client, temporal_services, task_queue)
    ask = "Urgent: is SKU-KEEL-2 in stock? Open a ticket if not"
    async with running_worker(client, db_pool, temporal_services, task_queue):
        with pytest.raises(RefusedError, match="already finished"):
            done = await keel.start(
                "Is SKU-KEEL-1 in stock?", tenant="acme", user="carol", agent="operations"
            )
            await done.result()
            await done.approve()
        approved = await keel.start(ask, tenant="acme", user="carol", agent="operations")
        waiting = None
        async for event in approved.events(poll_seconds=0.05):
            if event.kind == "waiting":
                waiting = event
                assert "high-priority-ticket" in event.waiting_for
                assert await approved.approve(reason="restock now", by="ops-lead") == "approved"
        assert waiting is not None
        resp = await approved.result()
        assert resp.outcome == "completed" and resp.steps[-1].state == StepState.SUCCEEDED, resp

        cancelled = await keel.start(ask, tenant="acme", user="carol", agent="operations")
        async for event in cancelled.events(poll_seconds=0.05):
            if event.kind == "waiting":
                assert await cancelled.cancel("not needed") == "cancelling"
        resp = await cancelled.result()
        assert resp.outcome == "cancelled", resp
        with pytest.raises(RefusedError, match="already finished"):
            await cancelled.cancel()


async def test_client_errors_and_unknown_agent(
    client: TemporalClient, db_pool: AsyncConnectionPool, temporal_services: Settings, task_queue: str
) -> None:
    keel = _client(client, temporal_services, task_queue)
    rid = f"t-{uuid.uuid4().hex[:8]}"
    async with running_worker(client, db_pool, temporal_services, task_queue):
        unknown = await keel.start("hello", tenant="acme", user="alice", agent="nobody", request_id=rid)
        resp = await unknown.result()
        again = await keel.start(
            "hello", tenant="acme", user="alice", agent="nobody", request_id=rid
        )  # the same request
        assert again.attached and again.workflow_id == unknown.workflow_id
        assert (await again.result()).workflow_id == resp.workflow_id
        with pytest.raises(RunExistsError, match="already used for a different request"):
            await keel.start("hello again", tenant="acme", user="alice", agent="nobody", request_id=rid)
    assert resp.outcome == "denied"
    assert "unknown agent 'nobody' (this worker serves: operations, shipping, support)" in resp.reason
    with pytest.raises(RunNotFoundError):
        await keel.run("agent/acme/support/no-such-run").result()
    with pytest.raises(ValidationError):
        await keel.start("hello", tenant="acme", user="alice", agent="Not A Name")
    with pytest.raises(ValidationError, match="tenant"):
        await keel.start("hello", user="alice")  # who asks is never defaulted


def test_definitions_are_validated_with_one_line(tmp_path: Path, test_env: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        Agent(name="Ops Team", instructions="x")
    with pytest.raises(ValidationError, match="unknown tier"):
        Agent(name="ops", instructions="x", tiers={"cheap": "offline"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: ops2\ninstructions: hi\ntols: [x]\n")
    with pytest.raises(AgentError, match=r"bad.yaml: \(top level\): unknown field 'tols'"):
        load_agents({"KEEL_AGENT_PATH": str(bad)})
    dupe = tmp_path / "agents"
    dupe.mkdir()
    (dupe / "support.yaml").write_text("name: support\ninstructions: a second support agent\n")
    with pytest.raises(AgentError, match="agent 'support' is defined twice"):
        load_agents({"KEEL_AGENT_PATH": str(dupe)})
    typo = tmp_path / "typo.yaml"  # a misspelt tool in the policy section: its rule would never apply
    typo.write_text(
        "name: ops3\ninstructions: hi\npolicy:\n  tools:\n    open_tiket:\n      approvals:\n"
        "        - {name: all, when: {}}\n"
    )
    cases = (
        (bad, "unknown field 'tols'"),
        (dupe, "agent 'support' is defined twice"),
        (typo, "agent 'ops3': policy.tools.open_tiket: unknown tool 'open_tiket'"),
    )
    for path, says in cases:
        env = {**test_env, "KEEL_AGENT_PATH": str(path)}
        listing = subprocess.run(
            [str(KEEL), "agents", "list"], env=env, capture_output=True, text=True, timeout=60
        )
        assert listing.returncode == 2 and listing.stderr.count("\n") == 1 and says in listing.stderr
        worker = subprocess.run(
            [sys.executable, str(PROJECT_ROOT / "worker.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert worker.returncode == 1 and worker.stderr.count("\n") == 1 and says in worker.stderr, (
            worker.stderr
        )


async def test_keel_run_and_list_with_agent(
    client: TemporalClient,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    test_env: dict[str, str],
) -> None:
    import json

    env = {**test_env, "KEEL_TASK_QUEUE": task_queue}
    ask = ["run", "--agent", "operations", "Is SKU-KEEL-1 in stock?", "--user", "carol", "--json"]
    async with running_worker(client, db_pool, temporal_services, task_queue):
        done = await asyncio.to_thread(
            subprocess.run, [str(KEEL), *ask], env=env, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 0, done.stderr
    resp = json.loads(done.stdout)
    assert resp["workflow_id"].startswith("agent/acme/operations/r-")
    assert [s["tool"] for s in resp["steps"]] == ["check_inventory"]
    for _ in range(50):
        listed = await asyncio.to_thread(
            subprocess.run,
            [str(KEEL), "list", "--agent", "operations", "--json", "--limit", "100"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        rows = {r["workflow_id"]: r for r in json.loads(listed.stdout or "[]")}
        if resp["workflow_id"] in rows:
            break
        await asyncio.sleep(0.2)
    assert rows[resp["workflow_id"]]["agent"] == "operations"
    bad = await asyncio.to_thread(
        subprocess.run, [str(KEEL), "run", "--agent", "Ops!", "hi"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: --agent: ")
