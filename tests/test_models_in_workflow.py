"""Whole runs through the real OpenAI and Anthropic SDKs, against local wire-format servers.

The worker's environment points the SDKs at the fakes, exactly as an operator would point
them at a real endpoint; nothing here touches the network or needs a key.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from keel.activities.models import close_clients
from keel.models import StepState
from keel.settings import Settings
from tests.helpers import make_order, request, run_agent, running_worker
from tests.providers.fake_anthropic import FakeAnthropic, tool_use
from tests.providers.fake_openai import FakeOpenAI, chat, error
from tests.providers.sloppy import Roles, role_of


@pytest.fixture(autouse=True)
async def _closed_breakers(db_pool: AsyncConnectionPool) -> AsyncIterator[None]:
    async with db_pool.connection() as conn:
        await conn.execute("delete from circuit_breakers where scope like 'model:%%'")
    yield


@pytest.fixture
def openai_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(responder=Roles()).start()  # judge and answer calls get defaults
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-000000000000")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
    yield server
    server.stop()


@pytest.fixture
def anthropic_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAnthropic]:
    server = FakeAnthropic(responder=Roles(anthropic=True)).start()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key-00000000")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
async def _fresh_clients() -> AsyncIterator[None]:
    yield
    await close_clients()


def _plan(order: str) -> dict:
    return {
        "steps": [{"id": "s1", "tool": "lookup_order", "args": {"order_id": order}, "why": "check status"}],
        "answer": "",
        "replan": False,
    }


async def test_openai_plan_with_usage_cost_and_429_retry(
    openai_server: FakeOpenAI,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    order = await make_order(db_pool)
    openai_server.push(
        error(429, "slow down", type_="rate_limit_error", headers={"retry-after": "1"}),
        chat(json.dumps(_plan(order)), prompt_tokens=1000, completion_tokens=100, cached_tokens=200),
    )
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, request(f"Where is order {order}?"))
    assert resp.outcome == "completed", resp.reason
    assert [s.tool for s in resp.steps] == ["lookup_order"]
    assert resp.steps[0].state == StepState.SUCCEEDED
    assert "openai:" in resp.model_label and "offline" not in resp.model_label
    ((model, cost),) = resp.spend.by_model.items()
    assert model.startswith("openai:") and cost > 0
    posts = [r for r in openai_server.requests if r.method == "POST"]
    # One 429 (retried by Temporal after retry-after), the plan, the judge, the answer.
    assert [role_of(r) for r in posts] == ["plan", "plan", "eval", "answer"]
    assert posts[1].body["response_format"]["type"] == "json_schema"


async def test_openai_invalid_plan_is_repaired_never_executed(
    openai_server: FakeOpenAI,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    order = await make_order(db_pool)
    bad = {"steps": [{"id": "s1", "tool": "drop_database", "args": {}}], "answer": ""}
    openai_server.push(chat(json.dumps(bad)), chat(json.dumps(_plan(order))))
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, request(f"Where is order {order}?"))
    assert resp.outcome == "completed"
    assert [s.tool for s in resp.steps] == ["lookup_order"]
    repair = openai_server.requests[1].body["messages"][-1]["content"]
    assert "drop_database" in repair and "could not be used" in repair


async def test_openai_plan_invalid_twice_fails_with_reason(
    openai_server: FakeOpenAI,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    bad = json.dumps({"steps": [{"id": "s1", "tool": "drop_database", "args": {}}], "answer": ""})
    openai_server.push(chat(bad), chat(bad))
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, request("Where is order ORD-123?"))
    assert resp.outcome == "failed"
    assert "unknown or unavailable tool 'drop_database'" in resp.reason
    assert resp.steps == ()


async def test_anthropic_tool_use_plan(
    anthropic_server: FakeAnthropic,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    order = await make_order(db_pool)
    anthropic_server.push(tool_use("plan", _plan(order)))
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, request(f"Where is order {order}?"))
    assert resp.outcome == "completed", resp.reason
    assert "anthropic:" in next(iter(resp.spend.by_model))
    sent = anthropic_server.requests[0].body
    assert sent["tool_choice"]["type"] == "tool"
    assert any("cache_control" in block for block in sent["system"])
