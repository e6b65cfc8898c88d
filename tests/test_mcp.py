"""MCP servers as tools, end to end against a real MCP server process (``tests/mcp_server.py``,
written with the official SDK): the tools are listed into the run's snapshot with behaviour
from their annotations; a read-only call; a destructive call that needs a human's approval
(the agent's policy section) and is audited; a server that dies mid-call (a read-only tool
is retried on a fresh server, a destructive non-idempotent one is not: at-most-once); and
the streamable-HTTP transport."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client as TemporalClient

from keel.activities import agent_defs
from keel.client import Client
from keel.devservices import free_port
from keel.models import Plan, StepState
from keel.settings import PROJECT_ROOT, Settings
from tests.doubles import tools as testing
from tests.doubles.models import ScriptedPlanner, step
from tests.helpers import plan_inputs, running_worker
from tests.test_replay import _shape

SERVER = PROJECT_ROOT / "tests" / "mcp_server.py"


def _agent_yaml(name: str, server: str) -> str:
    return f"""name: {name}
instructions: You manage records through an MCP server.
tools: []
mcp:
{server}
policy:
  tools:
    files.delete_record:
      approvals:
        - name: destructive-mcp-call
          timeout_seconds: 600
"""


@pytest.fixture
def mcp_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """A ``files`` agent (stdio server) and a test policy granting ``files:use``."""
    agents = tmp_path / "agents"
    agents.mkdir()
    stdio = (
        f"  - name: files\n    command: {sys.executable}\n    args: [{SERVER}, stdio]\n"
        "    permissions: [files:use]\n    cost_usd: 0.001"
    )
    (agents / "files.yaml").write_text(_agent_yaml("files", stdio))
    policy = tmp_path / "policy.yaml"
    policy.write_text(testing.policy_yaml().replace("tester: [test:run,", "tester: [files:use, test:run,"))
    effects = tmp_path / "effects.log"
    effects.write_text("")
    monkeypatch.setenv("KEEL_AGENT_PATH", str(agents))
    monkeypatch.setenv("MCP_EFFECTS", str(effects))
    # The test policy names the test tools (echo, test_effect): the catalogue must hold them,
    # or the policy is refused at load (issue 17: a rule for an unknown tool fails closed).
    monkeypatch.setenv("KEEL_TOOL_MODULES", testing.MODULE)
    testing.register()
    agent_defs.reset()
    yield {"agents": agents, "policy": policy, "effects": effects, "tmp": tmp_path}
    agent_defs.reset()


def _effects(paths: dict[str, Path]) -> list[str]:
    return paths["effects"].read_text().splitlines()


async def _run_with_approval(keel: Client, agent: str, approve: bool = True):  # type: ignore[no-untyped-def]
    run = await keel.start("do the records", tenant="acme", user="alice", agent=agent)
    async for event in run.events(poll_seconds=0.05):
        if event.kind == "waiting" and approve:
            assert "destructive-mcp-call" in event.waiting_for
            await run.approve(by="ops")
    return run, await run.result()


async def test_listing_read_only_call_and_destructive_call_with_approval(
    client: TemporalClient,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    mcp_env: dict[str, Path],
) -> None:
    planner = ScriptedPlanner(
        [
            Plan(
                steps=(
                    step("s1", "files.lookup", sku="SKU-KEEL-1"),
                    step("s2", "files.delete_record", id="r1"),
                )
            )
        ]
    )
    keel = Client(client, dataclasses.replace(temporal_services, task_queue=task_queue))
    async with (
        planner.serving(),
        running_worker(
            client,
            db_pool,
            temporal_services,
            task_queue,
            policy_file=mcp_env["policy"],
        ),
    ):
        run, resp = await _run_with_approval(keel, "files")
    assert resp.outcome == "completed", resp
    # Listing MCP tools is network I/O: such an agent's run never begins in process.
    _, _, scheduled = _shape(await client.get_workflow_handle(run.workflow_id).fetch_history())
    assert scheduled[0] == "begin_run", scheduled
    files = {"files.lookup", "files.delete_record", "files.archive"}
    assert {t.name for t in planner.calls[0].tools} == files  # what the model's prompt lists
    offered = {t.name: t for t in (await plan_inputs(client, run.workflow_id))[0].tools}
    assert set(offered) == files
    lookup, delete, archive = (
        offered["files.lookup"],
        offered["files.delete_record"],
        offered["files.archive"],
    )
    assert (lookup.side_effects, lookup.idempotent, lookup.max_attempts, lookup.risk) == (
        False,
        True,
        3,
        "low",
    )
    assert (delete.side_effects, delete.idempotent, delete.max_attempts, delete.risk) == (
        True,
        False,
        1,
        "high",
    )
    assert "at-most-once" in delete.description
    assert (archive.side_effects, archive.idempotent, archive.max_attempts) == (True, True, 3)
    assert lookup.args_schema["required"] == ["sku"]
    s1, s2 = resp.steps
    assert s1.state == StepState.SUCCEEDED and s1.result == {
        "text": "SKU-KEEL-1: 7 in stock",
        "structured": {"result": "SKU-KEEL-1: 7 in stock"},
    }
    assert s2.state == StepState.SUCCEEDED
    assert _effects(mcp_env) == ["delete r1"]
    assert resp.spend.by_tool == {"files.lookup": 1000, "files.delete_record": 1000}  # ledger-committed
    async with db_pool.connection() as conn:
        rows = await (
            await conn.execute(
                "select step_id, kind, subject, decision from audit_log where workflow_id=%s "
                "and kind in ('permission', 'approval') order by id",
                (run.workflow_id,),
            )
        ).fetchall()
    assert ("s1", "permission", "files.lookup", "allow") in rows
    # issue 17: an approval has a "requested" row and the answer row ("approve", with the approver)
    assert ("s2", "approval", "files.delete_record", "requested") in rows
    assert ("s2", "approval", "files.delete_record", "approve") in rows
    assert ("s2", "permission", "files.delete_record", "allow") in rows


async def test_a_server_dying_mid_call(
    client: TemporalClient,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    mcp_env: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keel = Client(client, dataclasses.replace(temporal_services, task_queue=task_queue))

    def script(inp):  # type: ignore[no-untyped-def]
        if inp.iteration > 1:  # after the failed step: stop (a new step would be a new call)
            return Plan(answer="stopped")
        if "delete" in inp.message:
            return Plan(steps=(step("s1", "files.delete_record", id="r2"),))
        return Plan(steps=(step("s1", "files.lookup", sku="SKU-KEEL-2"),))

    planner = ScriptedPlanner(script)
    async with (
        planner.serving(),
        running_worker(
            client,
            db_pool,
            temporal_services,
            task_queue,
            policy_file=mcp_env["policy"],
        ),
    ):
        # Destructive, not idempotent: its effect happened, the answer never came. One attempt.
        monkeypatch.setenv("MCP_DIE_ONCE", f"{mcp_env['tmp'] / 'died-delete'},delete_record")
        run = await keel.start("delete the record", tenant="acme", user="alice", agent="files")
        async for event in run.events(poll_seconds=0.05):
            if event.kind == "waiting":
                await run.approve(by="ops")
        resp = await run.result()
        (s1,) = resp.steps
        assert resp.outcome == "partial" and s1.state == StepState.FAILED, resp
        assert "failed mid-call; delete_record may have run and is at-most-once" in s1.error
        assert _effects(mcp_env) == ["delete r2"]  # exactly one effect, never sent again
        history = [e async for e in client.get_workflow_handle(run.workflow_id).fetch_history_events()]
        attempts = [
            e.activity_task_started_event_attributes.attempt
            for e in history
            if e.HasField("activity_task_started_event_attributes")
        ]
        assert max(attempts) == 1

        # Read-only: retried on a fresh server process, and answered.
        monkeypatch.setenv("MCP_DIE_ONCE", f"{mcp_env['tmp'] / 'died-lookup'},lookup")
        resp = await (await keel.start("look it up", tenant="acme", user="alice", agent="files")).result()
    (s1,) = resp.steps
    assert s1.state == StepState.SUCCEEDED and s1.result["text"] == "SKU-KEEL-2: 7 in stock", resp  # type: ignore[index]
    assert (mcp_env["tmp"] / "died-lookup").exists()


@contextlib.contextmanager
def _http_server(port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "http", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        import socket

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


async def test_streamable_http_server(
    client: TemporalClient,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    mcp_env: dict[str, Path],
) -> None:
    port = free_port()
    http = (
        f"  - name: web\n    transport: http\n    url: http://127.0.0.1:{port}/mcp\n"
        "    permissions: [files:use]\n    rate_limit_per_second: 5\n"
        '    headers: {X-Keel-Test: "${MCP_EFFECTS}"}'  # a custom HTTP client, values from the env
    )
    (mcp_env["agents"] / "web.yaml").write_text(
        _agent_yaml("web", http).replace("files.delete_record", "web.x")
    )
    agent_defs.reset()
    planner = ScriptedPlanner([Plan(steps=(step("s1", "web.archive", id="a1"),))])
    keel = Client(client, dataclasses.replace(temporal_services, task_queue=task_queue))
    with _http_server(port):
        async with (
            planner.serving(),
            running_worker(
                client,
                db_pool,
                temporal_services,
                task_queue,
                policy_file=mcp_env["policy"],
            ),
        ):
            resp = await (await keel.start("archive it", tenant="acme", user="alice", agent="web")).result()
    assert resp.outcome == "completed", resp
    assert {t.name for t in planner.calls[0].tools} == {"web.lookup", "web.delete_record", "web.archive"}
    assert resp.steps[0].result["text"] == "archived a1"  # type: ignore[index]
    assert _effects(mcp_env) == ["archive a1"]
    # Rate-limited like a native tool: on the server's own queue, whose rate Temporal enforces.
    history = [e async for e in client.get_workflow_handle(resp.workflow_id).fetch_history_events()]
    queues = {
        e.activity_task_scheduled_event_attributes.task_queue.name
        for e in history
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == "run_tool"
    }
    assert queues == {f"{task_queue}-mcp-web"}


def test_agents_list_asks_the_servers(mcp_env: dict[str, Path], test_env: dict[str, str]) -> None:
    import json
    import os

    keel = Path(sys.executable).parent / "keel"
    env = {**test_env, "KEEL_AGENT_PATH": os.environ["KEEL_AGENT_PATH"]}
    out = subprocess.run(
        [str(keel), "agents", "list", "--mcp", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    files = next(r for r in json.loads(out.stdout) if r["name"] == "files")
    tools = {t["name"]: t for t in files["mcp"]["tools"]}
    assert tools["files.delete_record"]["at_most_once"] and not tools["files.lookup"]["side_effects"]
    assert tools["files.archive"]["retried"] and files["mcp"]["problems"] == []


async def test_a_server_that_cannot_be_listed_is_reported(
    client: TemporalClient,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    mcp_env: dict[str, Path],
) -> None:
    gone = "  - name: gone\n    command: /nonexistent/mcp-server\n    permissions: [files:use]"
    (mcp_env["agents"] / "gone.yaml").write_text(
        _agent_yaml("gone", gone).replace("files.delete_record", "gone.x")
    )
    agent_defs.reset()
    planner = ScriptedPlanner([Plan(answer="nothing to do")])
    keel = Client(client, dataclasses.replace(temporal_services, task_queue=task_queue))
    async with (
        planner.serving(),
        running_worker(
            client,
            db_pool,
            temporal_services,
            task_queue,
            policy_file=mcp_env["policy"],
        ),
    ):
        resp = await (await keel.start("anything", tenant="acme", user="alice", agent="gone")).result()
    assert resp.outcome == "completed" and "mcp_unavailable:gone" in resp.flags, resp
    assert planner.calls[0].tools == ()  # the planner was offered nothing it could not call
