"""Circuit breakers shared through PostgreSQL: state machine, one probe fleet-wide, leases,
the tool activity, the agent's fallback, and provider fallback in ``call_model``."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities import breaker
from keel.activities.breaker import BreakerConfig
from keel.activities.tools import registry
from keel.activities.tools.registry import REGISTRY, ToolContext, ToolError, tool
from keel.agent_io import PlanInput, PlanOutput
from keel.models import Plan, PlanStep, StepState, ToolCall
from keel.settings import Settings
from tests.helpers import request, run_agent, running_worker

FAST = BreakerConfig(failure_threshold=3, cooldown_seconds=0.4, probe_lease_seconds=0.5)


def _scope() -> str:
    return f"tool:t{uuid.uuid4().hex[:8]}"


async def _state(pool: AsyncConnectionPool, scope: str) -> tuple[str, int]:
    async with pool.connection() as conn:
        row = await (
            await conn.execute(
                "select state, consecutive_failures from circuit_breakers where scope=%s", (scope,)
            )
        ).fetchone()
    return (row[0], row[1]) if row else ("closed", 0)


async def _events(pool: AsyncConnectionPool, scope: str) -> list[tuple[str, str]]:
    async with pool.connection() as conn:
        return [(e.from_state, e.to_state) for e in reversed(await breaker.events(conn, scope))]


async def _fail(pool: AsyncConnectionPool, scope: str, n: int, owner: str = "w") -> None:
    async with pool.connection() as conn:
        for _ in range(n):
            await breaker.record_failure(conn, scope, FAST, owner, "503 upstream")


# ------------------------------------------------------------------ state machine
async def test_opens_after_threshold_and_refuses_until_cooldown(
    db_pool: AsyncConnectionPool,
) -> None:
    scope = _scope()
    await _fail(db_pool, scope, 2)
    assert await _state(db_pool, scope) == ("closed", 2)
    async with db_pool.connection() as conn:
        assert (await breaker.acquire(conn, scope, FAST, "a")).allowed
        await breaker.record_success(conn, scope, "a")  # a success forgets the failures
    assert await _state(db_pool, scope) == ("closed", 0)
    await _fail(db_pool, scope, 3)
    assert (await _state(db_pool, scope))[0] == "open"
    async with db_pool.connection() as conn:
        refused = await breaker.acquire(conn, scope, FAST, "b")
    assert not refused.allowed and refused.state == "open" and refused.retry_at is not None
    err = breaker.circuit_open_error(scope, refused)
    assert err.type == "CircuitOpen" and err.non_retryable
    assert err.message.startswith(f"circuit open for {scope[5:]} until ")
    assert await _events(db_pool, scope) == [("closed", "open")]


async def test_exactly_one_probe_across_concurrent_callers(db_pool: AsyncConnectionPool) -> None:
    scope = _scope()
    await _fail(db_pool, scope, 3)
    await asyncio.sleep(FAST.cooldown_seconds + 0.1)

    async def caller(i: int) -> breaker.Permit:
        async with db_pool.connection() as conn:
            return await breaker.acquire(conn, scope, FAST, f"w{i}")

    permits = await asyncio.gather(*(caller(i) for i in range(16)))
    assert sum(p.allowed for p in permits) == 1
    assert [p.probe for p in permits if p.allowed] == [True]
    assert (await _state(db_pool, scope))[0] == "half_open"


async def test_probe_success_closes_failure_reopens_and_lease_expires(
    db_pool: AsyncConnectionPool,
) -> None:
    scope = _scope()
    await _fail(db_pool, scope, 3)
    await asyncio.sleep(FAST.cooldown_seconds + 0.1)
    async with db_pool.connection() as conn:
        assert (await breaker.acquire(conn, scope, FAST, "p1")).probe
        # A straggler that was let through before the breaker opened cannot close it.
        assert await breaker.record_success(conn, scope, "straggler") is None
        assert (await _state(db_pool, scope))[0] == "half_open"
        # The prober dies silently: after its lease another worker may probe.
        assert not (await breaker.acquire(conn, scope, FAST, "p2")).allowed
        await asyncio.sleep(FAST.probe_lease_seconds + 0.1)
        assert (await breaker.acquire(conn, scope, FAST, "p2")).probe
        assert await breaker.record_failure(conn, scope, FAST, "p2", "still down") == ("half_open", "open")
        await asyncio.sleep(FAST.cooldown_seconds + 0.1)
        assert (await breaker.acquire(conn, scope, FAST, "p3")).probe
        assert await breaker.record_success(conn, scope, "p3") == ("half_open", "closed")
        assert (await breaker.acquire(conn, scope, FAST, "any")).allowed
        views = {v.scope: v for v in await breaker.snapshot(conn)}
    assert views[scope].state == "closed" and views[scope].opened_count == 2
    assert await _events(db_pool, scope) == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


# ------------------------------------------------------------------ the tool activity
class _Args(BaseModel):
    n: int = 0


@contextlib.contextmanager
def _registered(name: str, fn: Any, **kw: Any) -> Iterator[None]:
    """A tool that exists only inside this test (the registry is process-global)."""
    tool(name, description=f"test tool {name}", args=_Args, **kw)(fn)
    try:
        yield
    finally:
        REGISTRY.pop(name, None)
        registry._HIDDEN.discard(name)


@pytest.fixture
def fast_breakers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_BREAKER_THRESHOLD", "3")
    monkeypatch.setenv("KEEL_BREAKER_COOLDOWN_S", "60")


async def test_run_tool_counts_only_transient_failures(
    db_pool: AsyncConnectionPool,
    fast_breakers: None,
) -> None:
    from keel.activities.tools import ToolActivities

    name = f"flaky_{uuid.uuid4().hex[:6]}"
    calls: list[int] = []

    async def flaky(ctx: ToolContext, args: _Args) -> dict[str, Any]:
        calls.append(args.n)
        if args.n < 0:
            raise ToolError("no such thing", retryable=False)
        raise ToolError("upstream 503", retryable=True)

    run = ToolActivities(db_pool).run_tool
    env = ActivityEnvironment()

    def call(n: Any, key: str = "") -> ToolCall:
        return ToolCall(
            tool=name, args={"n": n}, tenant="acme", idempotency_key=key or f"bk/{uuid.uuid4().hex}"
        )

    with _registered(name, flaky):
        with pytest.raises(ApplicationError, match="invalid arguments"):
            await env.run(run, call("not a number"))  # validation: never counted
        with pytest.raises(ApplicationError) as perm:
            await env.run(run, call(-1))  # permanent: the tool answered, not counted
        assert perm.value.type == "ToolPermanentError"
        assert await _state(db_pool, f"tool:{name}") == ("closed", 0)
        for _ in range(3):
            with pytest.raises(ApplicationError) as transient:
                await env.run(run, call(1))
            assert transient.value.type == "ToolTransientError"
        assert (await _state(db_pool, f"tool:{name}"))[0] == "open"
        before = len(calls)
        with pytest.raises(ApplicationError) as refused:
            await env.run(run, call(1))
        assert refused.value.type == "CircuitOpen" and refused.value.non_retryable
        assert f"circuit open for {name} until" in refused.value.message
        assert len(calls) == before  # the tool was not called at all
        # A compensation is never refused for good: it waits out the cooldown instead.
        with pytest.raises(ApplicationError) as comp:
            await env.run(run, call(1, key=f"bk/{uuid.uuid4().hex}/s1/compensate"))
        assert comp.value.type == "CircuitOpen" and not comp.value.non_retryable
        assert comp.value.next_retry_delay is not None


async def test_replay_of_a_recorded_effect_is_served_while_open(
    db_pool: AsyncConnectionPool,
    fast_breakers: None,
) -> None:
    from keel.activities.tools import ToolActivities

    name = f"once_{uuid.uuid4().hex[:6]}"

    async def once(ctx: ToolContext, args: _Args) -> dict[str, Any]:
        return {"n": args.n}

    key = f"bk/{uuid.uuid4().hex}"
    with _registered(name, once):
        env, run = ActivityEnvironment(), ToolActivities(db_pool).run_tool
        first = await env.run(run, ToolCall(tool=name, args={"n": 7}, tenant="acme", idempotency_key=key))
        await _fail(db_pool, f"tool:{name}", 3)
        again = await env.run(run, ToolCall(tool=name, args={"n": 7}, tenant="acme", idempotency_key=key))
    assert again.replayed and again.data == first.data == {"n": 7}


async def test_open_breaker_makes_the_agent_use_the_declared_fallback(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    suffix = uuid.uuid4().hex[:6]
    primary, backup = f"primary_{suffix}", f"backup_{suffix}"
    ran: list[str] = []

    async def use_primary(ctx: ToolContext, args: _Args) -> dict[str, Any]:
        ran.append(primary)
        return {"via": "primary"}

    async def use_backup(ctx: ToolContext, args: _Args) -> dict[str, Any]:
        ran.append(backup)
        return {"via": "backup"}

    @activity.defn(name="plan")
    async def plan(inp: PlanInput) -> PlanOutput:
        steps = (PlanStep(id="s1", tool=primary, args={"n": 1}),) if inp.iteration == 1 else ()
        return PlanOutput(plan=Plan(steps=steps, answer="done"), model="offline")

    async with db_pool.connection() as conn:  # an outage another worker already saw
        await conn.execute(
            "insert into circuit_breakers (scope, state, consecutive_failures, opened_until) "
            "values (%s, 'open', 5, now() + interval '10 minutes')",
            (f"tool:{primary}",),
        )
    with _registered(primary, use_primary, fallback=backup), _registered(backup, use_backup):
        async with running_worker(client, db_pool, temporal_services, task_queue, extra_activities=[plan]):
            resp = await run_agent(client, task_queue, request("check the thing", session=f"s-{suffix}"))
    assert ran == [backup]
    first, second = resp.steps[0], resp.steps[1]
    assert first.tool == primary and first.state == StepState.FAILED
    assert f"circuit open for {primary} until" in first.error
    assert second.tool == backup and second.state == StepState.SUCCEEDED
    assert resp.outcome in ("completed", "partial")  # the primary step stays failed


# ------------------------------------------------------------------ providers
async def test_provider_breaker_opens_and_falls_back_to_the_other_provider(
    db_pool: AsyncConnectionPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from keel.activities import llm
    from keel.activities.models import close_clients
    from keel.models import ChatMessage, ModelCall
    from tests.providers import fake_anthropic as fa
    from tests.providers import fake_openai as fo

    openai, anthropic = fo.FakeOpenAI().start(), fa.FakeAnthropic().start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-fake-openai-key-0123456789")
    monkeypatch.setenv("OPENAI_BASE_URL", openai.url + "/v1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-fake-anthropic-key-0123456789")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", anthropic.url)
    monkeypatch.setenv("KEEL_BREAKER_THRESHOLD", "2")
    monkeypatch.setenv("KEEL_BREAKER_COOLDOWN_S", "60")
    async with db_pool.connection() as conn:  # earlier runs of this test left state behind
        await conn.execute("delete from circuit_breakers where scope like 'model:%%'")
    call = ModelCall(
        model="openai:gpt-4o-mini", role="respond", messages=(ChatMessage(role="user", content="hi"),)
    )
    env = ActivityEnvironment()
    token = breaker.BREAKER_POOL.set(db_pool)
    try:
        assert (
            llm.fallback_model("openai:gpt-4o-mini", {"ANTHROPIC_API_KEY": "k"})
            == "anthropic:claude-haiku-4-5"
        )
        assert llm.fallback_model("openai:gpt-4o-mini", {"OPENAI_API_KEY": "k"}) is None
        openai.push(fo.error(503, "down"), fo.error(400, "bad request"), fo.error(503, "down"))
        for _ in range(3):  # 503, 400 (the provider answered: resets), 503
            with pytest.raises(ApplicationError):
                await env.run(llm.call_model, call)
        assert await _state(db_pool, "model:openai") == ("closed", 1)
        openai.push(fo.error(503, "down"))
        with pytest.raises(ApplicationError):
            await env.run(llm.call_model, call)
        assert (await _state(db_pool, "model:openai"))[0] == "open"
        anthropic.push(fa.text("from the other provider"))
        result = await env.run(llm.call_model, call)
        assert result.text == "from the other provider"
        assert result.model.startswith("anthropic:")
        monkeypatch.delenv("ANTHROPIC_API_KEY")
        with pytest.raises(ApplicationError) as refused:
            await env.run(llm.call_model, call)
        assert refused.value.type == "CircuitOpen" and "circuit open for openai" in refused.value.message
    finally:
        breaker.BREAKER_POOL.reset(token)
        openai.stop()
        anthropic.stop()
        await close_clients()
        async with db_pool.connection() as conn:
            await conn.execute("delete from circuit_breakers where scope like 'model:%%'")
