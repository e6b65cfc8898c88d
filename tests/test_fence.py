"""The fence (issue 15, item 1) on its own: the durable record decides a step's state.

The fault test (``test_fault.py``) kills real processes; the moments the fence exists for
are too narrow to hit that way on purpose (it never recovered an effect there). These two
tests make those moments happen on the real dev server, database and tool activity:

* an effect commits but its answer is lost on every attempt: the run asks the database,
  reports the step succeeded, and compensates it when the run aborts later;
* an attempt still in flight when the run fences the key (it passed the first recorded
  check, then waited on the key's lock) finds the abandoned record and does not act;
* two attempts at one refund: the second waits for the first's transaction and returns its
  effect instead of running the tool's own checks against it (the failure issue 15 saw).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities import audit, concurrency, ledger
from keel.activities.control import ControlActivities
from keel.activities.tools import ToolActivities, effects
from keel.agent_io import SettleInput, SettleResult
from keel.budget import ReleaseRequest, ReleaseResult, scope_path
from keel.models import PlanStep, StepState, ToolCall, ToolResult
from keel.settings import Settings
from tests.doubles import tools as testing
from tests.doubles.models import ScriptedPlanner, step
from tests.helpers import make_order, running_worker
from tests.scripted import plan, start, write_policy


class _AnswerLost:
    """``run_tool`` whose answer never reaches the workflow for ``test_effect``: the real
    activity runs (the first attempt acts, the retries replay its record), then the attempt
    fails as if the worker died between the commit and reporting it."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._real = ToolActivities(pool)

    @activity.defn(name="run_tool")
    async def run_tool(self, call: ToolCall) -> ToolResult:
        out = await self._real.run_tool(call)
        if call.tool == "test_effect":
            raise ApplicationError("connection lost after the commit", type="AnswerLost")
        return out


@pytest.mark.timeout(90)
async def test_an_effect_whose_answer_is_lost_is_reported_and_compensated(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plans = [
        plan(
            step("s1", "test_effect", note="answer lost"),
            # Upper case breaks the policy's echo constraint: the gate denies it, so the run
            # aborts after s1.
            step("s2", "echo", note="DENIED"),
        )
    ]
    monkeypatch.setenv("KEEL_TOOL_MODULES", testing.MODULE)
    testing.register()
    planner, lost = ScriptedPlanner(plans), _AnswerLost(db_pool)
    async with (
        planner.serving(),
        running_worker(  # scripted_worker's setup, with run_tool replaced as well
            client,
            db_pool,
            temporal_services,
            task_queue,
            policy_file=write_policy(tmp_path),
            extra_activities=[lost.run_tool],
        ),
    ):
        resp = await (await start(client, task_queue)).result()
    wid = resp.workflow_id
    steps = {s.id: s for s in resp.steps}
    assert resp.outcome == "denied", resp
    assert "effect_recovered" in resp.flags, resp.flags
    assert steps["s1"].state == StepState.COMPENSATED, steps["s1"]
    assert resp.compensated == ("s1",)
    async with db_pool.connection() as conn:
        rows = await (
            await conn.execute(
                "select note, status from test_effects where idempotency_key = %s", (f"{wid}/s1",)
            )
        ).fetchall()
        trail = await audit.trail(conn, wid)
        view = await ledger.show(conn, scope_path("acme", "default", "alice", wid)[-1])
    assert rows == [("answer lost", "undone")], rows  # acted once, undone once
    settle = [r for r in trail if r.step_id == "s1" and r.idem_key.endswith("/tool-settle")]
    assert [r.decision for r in settle] == ["succeeded"], [(r.idem_key, r.decision) for r in trail]
    assert view is not None and view.spent_micros == resp.spend.total_micros


@pytest.mark.timeout(60)
async def test_an_attempt_waiting_on_the_key_when_the_run_fences_it_does_not_act(
    pg_url: str, db_pool: AsyncConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_TOOL_MODULES", testing.MODULE)
    testing.register()
    key = f"agent/acme/fence-{id(object())}/s1"
    call = ToolCall(
        tool="test_effect",
        args={"note": "zombie"},
        idempotency_key=key,
        tenant="acme",
        user="alice",
        workflow_id=key.rsplit("/", 1)[0],
        step_id="s1",
    )
    # The run's side: the key's lock is held, as settle_step holds it while it fences.
    async with await psycopg.AsyncConnection.connect(pg_url) as run:
        await effects.lock(run, key)
        zombie = asyncio.create_task(ActivityEnvironment().run(ToolActivities(db_pool).run_tool, call))

        async def waiting() -> bool:
            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as c:
                cur = await c.execute(
                    "select count(*) from pg_locks where locktype = 'advisory' and not granted"
                )
                row = await cur.fetchone()
            return bool(row and row[0])

        for _ in range(200):  # the attempt passed its first check and waits on the lock
            if await waiting():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the attempt never waited on the key's lock")
        assert await effects.fence(run, key, "test_effect", "acme", "out of attempts") is None
        await run.commit()
    with pytest.raises(ApplicationError) as e:
        await zombie
    assert e.value.type == "StepAbandoned", e.value
    async with db_pool.connection() as conn:
        acted = await (
            await conn.execute("select count(*) from test_effects where idempotency_key = %s", (key,))
        ).fetchone()
        record = await (
            await conn.execute("select ok from tool_effects where idempotency_key = %s", (key,))
        ).fetchall()
    assert acted == (0,), "an attempt acted on a key the run had abandoned"
    assert record == [(False,)], record


async def _waiters(pg_url: str, locktype: str) -> int:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as c:
        cur = await c.execute(
            "select count(*) from pg_locks where locktype = %s and not granted", (locktype,)
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _until_waiting(pg_url: str, locktype: str, n: int) -> None:
    for _ in range(200):
        if await _waiters(pg_url, locktype) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no attempt waited on a {locktype} lock")


@pytest.mark.timeout(60)
async def test_a_second_attempt_on_a_key_returns_the_first_ones_refund_instead_of_judging_it(
    pg_url: str, db_pool: AsyncConnectionPool
) -> None:
    """Two attempts at one refund (a retry and the zombie it replaced): the second waits for
    the first's whole transaction and returns its effect. Run the tool instead, and its own
    check ("exceeds what is left on the order") would fail the step although it succeeded."""
    order = await make_order(db_pool, total_usd=20.0)
    key = f"agent/acme/race-{order}/s2"
    call = ToolCall(
        tool="issue_refund",
        args={"order_id": order, "amount_usd": 20.0},
        idempotency_key=key,
        tenant="acme",
        user="alice",
        workflow_id=key.rsplit("/", 1)[0],
        step_id="s2",
    )
    tools = ToolActivities(db_pool)
    async with await psycopg.AsyncConnection.connect(pg_url) as pin:
        await pin.execute("select 1 from orders where id = %s for update", (order,))
        first = asyncio.create_task(ActivityEnvironment().run(tools.run_tool, call))
        await _until_waiting(pg_url, "transactionid", 1)  # inside its effect's transaction
        second = asyncio.create_task(ActivityEnvironment().run(tools.run_tool, call))
        await _until_waiting(pg_url, "advisory", 1)  # past its first check, on the key's lock
        await pin.rollback()
    a, b = await first, await second
    assert (a.ok, a.replayed, b.ok, b.replayed) == (True, False, True, True), (a, b)
    assert a.data["refund_id"] == b.data["refund_id"]
    async with db_pool.connection() as conn:
        rows = await (
            await conn.execute("select amount_micros, status from refunds where order_id = %s", (order,))
        ).fetchall()
    assert rows == [(20_000_000, "issued")], rows


class _NeverActs:
    """``run_tool`` whose ``test_effect`` attempts die before acting (non-retryable, so the
    step fails at once and the run goes to the fence)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._real = ToolActivities(pool)

    @activity.defn(name="run_tool")
    async def run_tool(self, call: ToolCall) -> ToolResult:
        if call.tool == "test_effect":
            raise ApplicationError("worker lost before the effect", type="Lost", non_retryable=True)
        return await self._real.run_tool(call)


class _DatabaseAway:
    """``settle_step`` that cannot reach the database for its first ``outage`` attempts —
    more than the control-plane retry policy allows (10) — then the real one."""

    def __init__(self, pool: AsyncConnectionPool, outage: int) -> None:
        self._real, self._left = ControlActivities(pool), outage

    @activity.defn(name="settle_step")
    async def settle_step(self, inp: SettleInput) -> SettleResult:
        if self._left > 0:
            self._left -= 1
            raise ApplicationError("connection refused (database restarting)", type="OperationalError")
        return await self._real.settle_step(inp)


@pytest.mark.timeout(120)
async def test_the_fence_waits_for_the_database_instead_of_ending_the_run_undecided(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found with a 240 s PostgreSQL outage during a refund: the refund's attempts ran out,
    then ``settle_step`` ran out of its 10 attempts, and the run ended ``failed`` with the
    refund step still ``running``, no fence and no settle audit row: the step's fate was
    never asked of the database, and an attempt still in flight could have acted unreported."""
    monkeypatch.setenv("KEEL_TOOL_MODULES", testing.MODULE)
    testing.register()
    planner = ScriptedPlanner([plan(step("s1", "test_effect", note="never acts")), plan()])
    away = _DatabaseAway(db_pool, outage=12)
    async with (
        planner.serving(),
        running_worker(
            client,
            db_pool,
            temporal_services,
            task_queue,
            policy_file=write_policy(tmp_path),
            extra_activities=[_NeverActs(db_pool).run_tool, away.settle_step],
        ),
    ):
        resp = await (await start(client, task_queue)).result()
    wid = resp.workflow_id
    steps = {s.id: s for s in resp.steps}
    assert away._left == 0
    assert "activity_failed" not in resp.flags, (resp.outcome, resp.reason)
    assert steps["s1"].state == StepState.FAILED, steps["s1"]
    async with db_pool.connection() as conn:
        record = await (
            await conn.execute("select ok from tool_effects where idempotency_key = %s", (f"{wid}/s1",))
        ).fetchall()
        trail = await audit.trail(conn, wid)
    assert record == [(False,)], "the key was never fenced"
    settle = [r.decision for r in trail if r.step_id == "s1" and r.idem_key.endswith("/tool-settle")]
    assert settle == ["failed"], [(r.idem_key, r.decision) for r in trail]


class _ReleaseRefused:
    """``budget_release`` that the ledger refuses (non-retryable, as ``_refusals`` raises it)."""

    calls = 0

    @activity.defn(name="budget_release")
    async def budget_release(self, req: ReleaseRequest) -> ReleaseResult:
        self.calls += 1
        raise ApplicationError("ledger refused the release", type="IdempotencyConflict", non_retryable=True)


@pytest.mark.timeout(90)
async def test_a_release_refused_at_the_end_still_ends_through_the_one_exit(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A local activity's failure reaches workflow code as the activity's ``ApplicationError``,
    not as an ``ActivityError``: the ending caught only the latter, so a refused release of a
    hold left open (a skipped step's admitted hold) skipped the finish row, memory and the
    run slot, and failed the workflow."""
    monkeypatch.setenv("KEEL_TOOL_MODULES", testing.MODULE)
    testing.register()
    skipped = PlanStep(
        id="s2", tool="echo", args={"note": "never"}, when={"step": "s1", "field": "note", "equals": "x"}
    )
    planner = ScriptedPlanner([plan(step("s1", "test_effect", note="acts"), skipped), plan()])
    refused = _ReleaseRefused()
    async with (
        planner.serving(),
        running_worker(
            client,
            db_pool,
            temporal_services,
            task_queue,
            policy_file=write_policy(tmp_path),
            extra_activities=[refused.budget_release],
        ),
    ):
        resp = await (await start(client, task_queue)).result()
    wid = resp.workflow_id
    assert refused.calls >= 1
    assert resp.outcome == "completed", (resp.outcome, resp.reason)
    assert "release_failed" in resp.flags, resp.flags
    async with db_pool.connection() as conn:
        trail = await audit.trail(conn, wid)
        slots = await concurrency.in_flight(conn, "acme")
        mine = await (
            await conn.execute("select count(*) from run_slots where workflow_id=%s", (wid,))
        ).fetchone()
    assert [r.decision for r in trail if r.idem_key == f"{wid}/finish"] == ["completed"]
    assert mine == (0,), (mine, slots)
