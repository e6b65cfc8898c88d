"""The durable record decides a step's state (``activities/tools/effects.py``).

Real PostgreSQL, the real ``run_tool`` activity (in Temporal's ``ActivityEnvironment``) and
the test tools. Two attempts racing on one key produce one effect, and the loser returns
the winner's; a fence after an effect says the step succeeded; a fence before one makes
every later attempt refuse to act.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities.control import ControlActivities
from keel.activities.tools import ToolActivities
from keel.agent_io import SettleInput
from keel.models import ToolCall
from tests.doubles import tools as testing
from tests.helpers import make_order


@pytest.fixture(autouse=True)
def _test_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_TOOL_MODULES", testing.MODULE)
    testing.register()


def _call(key: str, tool: str = "slow_step", **args: object) -> ToolCall:
    wid, step = key.rsplit("/", 1)
    return ToolCall(
        tool=tool,
        args=args or {"seconds": 0.3, "note": key},
        idempotency_key=key,
        tenant="acme",
        user="alice",
        workflow_id=wid,
        step_id=step,
    )


async def _effects(pool: AsyncConnectionPool, key: str) -> int:
    async with pool.connection() as conn:
        row = await (
            await conn.execute("select count(*) from test_effects where idempotency_key=%s", (key,))
        ).fetchone()
    assert row is not None
    return int(row[0])


def _settle(key: str, tool: str = "slow_step") -> SettleInput:
    wid, step = key.rsplit("/", 1)
    return SettleInput(
        workflow_id=wid,
        tenant="acme",
        user="alice",
        step_id=step,
        subject=tool,
        decision="failed",
        reason="activity Heartbeat timeout",
        effect_key=key,
    )


async def test_racing_attempts_make_one_effect_and_the_loser_returns_it(db_pool: AsyncConnectionPool) -> None:
    tools = ToolActivities(db_pool)
    key = f"agent/acme/fx-{uuid.uuid4().hex[:8]}/s1"
    a, b = await asyncio.gather(
        ActivityEnvironment().run(tools.run_tool, _call(key)),
        ActivityEnvironment().run(tools.run_tool, _call(key)),
    )
    assert await _effects(db_pool, key) == 1
    assert sorted([a.replayed, b.replayed]) == [False, True]
    assert a.data["effect_id"] == b.data["effect_id"]


async def test_a_second_attempt_returns_the_refund_instead_of_checking_against_it(
    db_pool: AsyncConnectionPool,
) -> None:
    """The finding of issue 15: the loser ran the refund's own checks against the winner's
    effect ("exceeds what is left ($0.00)") and failed "permanently" while the refund stood."""
    tools = ToolActivities(db_pool)
    order = await make_order(db_pool, total_usd=19.17)
    key = f"agent/acme/fx-{uuid.uuid4().hex[:8]}/s2"
    call = _call(key, "issue_refund", order_id=order, amount_usd=19.17)
    a, b = await asyncio.gather(
        ActivityEnvironment().run(tools.run_tool, call), ActivityEnvironment().run(tools.run_tool, call)
    )
    assert a.ok and b.ok and a.data == b.data
    async with db_pool.connection() as conn:
        row = await (
            await conn.execute("select count(*) from refunds where order_id=%s and status='issued'", (order,))
        ).fetchone()
    assert row is not None and row[0] == 1


async def test_a_fence_after_the_effect_says_the_step_succeeded(db_pool: AsyncConnectionPool) -> None:
    tools, control = ToolActivities(db_pool), ControlActivities(db_pool)
    key = f"agent/acme/fx-{uuid.uuid4().hex[:8]}/s1"
    done = await ActivityEnvironment().run(tools.run_tool, _call(key))
    settled = await ActivityEnvironment().run(control.settle_step, _settle(key))
    assert settled.recorded is not None and settled.recorded.data == done.data


async def test_a_fence_before_the_effect_stops_every_later_attempt(db_pool: AsyncConnectionPool) -> None:
    tools, control = ToolActivities(db_pool), ControlActivities(db_pool)
    key = f"agent/acme/fx-{uuid.uuid4().hex[:8]}/s1"
    settled = await ActivityEnvironment().run(control.settle_step, _settle(key))
    assert settled.recorded is None
    with pytest.raises(ApplicationError) as err:
        await ActivityEnvironment().run(tools.run_tool, _call(key))
    assert err.value.type == "StepAbandoned" and err.value.non_retryable
    assert await _effects(db_pool, key) == 0


async def test_a_fence_waits_for_an_attempt_in_flight_and_then_sees_its_effect(
    db_pool: AsyncConnectionPool,
) -> None:
    """The zombie case: the server gave up on an attempt that is still inside its effect's
    transaction. The fence takes the key's lock, so it decides only after that attempt ends."""
    tools, control = ToolActivities(db_pool), ControlActivities(db_pool)
    key = f"agent/acme/fx-{uuid.uuid4().hex[:8]}/s1"
    zombie = asyncio.create_task(ActivityEnvironment().run(tools.run_tool, _call(key, seconds=1.0)))
    await asyncio.sleep(0.4)  # the zombie holds the key's lock, its effect not yet committed
    settled = await ActivityEnvironment().run(control.settle_step, _settle(key))
    await zombie
    assert settled.recorded is not None, "the fence decided before the attempt in flight ended"
    assert await _effects(db_pool, key) == 1


async def test_releasing_a_hold_never_placed_is_nothing_held(db_pool: AsyncConnectionPool) -> None:
    control = ControlActivities(db_pool)
    key = f"agent/acme/fx-{uuid.uuid4().hex[:8]}/s1"
    inp = _settle(key).model_copy(update={"reserve_key": f"{key}/reserve", "effect_key": ""})
    assert (await ActivityEnvironment().run(control.settle_step, inp)).recorded is None
