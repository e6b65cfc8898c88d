"""The "sloppy model" suite: whole runs against fake OpenAI/Anthropic servers that answer
the way real, imperfect models and endpoints do, through the real SDKs.

For every case: no false "completed", the run ends with a one-line reason, and every call
the server answered is in the ledger — one hold per call, committed with the usage the
server reported (the test prices the server's own log and compares), or with its full hold
when no usage came back. The run's spend report equals the ledger.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer

from keel.activities.models import close_clients
from keel.codec import data_converter, parse_keys
from keel.models import AgentResponse, Plan
from keel.settings import Settings
from keel.workflows.agent import AgentWorkflow
from tests.conftest import TEST_CODEC_KEYS
from tests.helpers import make_order, request, run_agent, running_worker
from tests.providers import fake_openai as fo
from tests.providers.fake_anthropic import FakeAnthropic
from tests.providers.fake_openai import FakeOpenAI
from tests.providers.sloppy import Roles, ledger_model_rows, role_of, server_bill

GOLDEN = Path(__file__).parent / "histories" / "model_run_judged_cascade.json"


@pytest.fixture(autouse=True)
async def _fresh(db_pool: AsyncConnectionPool) -> AsyncIterator[None]:
    """Breakers are shared state in PostgreSQL: each case starts with closed ones."""
    async with db_pool.connection() as conn:
        await conn.execute("delete from circuit_breakers where scope like 'model:%%'")
    yield
    await close_clients()
    async with db_pool.connection() as conn:
        await conn.execute("delete from circuit_breakers where scope like 'model:%%'")


@pytest.fixture
def openai_roles(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeOpenAI, Roles]]:
    roles = Roles()
    server = FakeOpenAI(responder=roles).start()
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-000000000000")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
    yield server, roles
    server.stop()


@pytest.fixture
def anthropic_roles(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeAnthropic, Roles]]:
    roles = Roles(anthropic=True)
    server = FakeAnthropic(responder=roles).start()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key-00000000")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    yield server, roles
    server.stop()


def _lookup(order: str, **extra: Any) -> dict[str, Any]:
    step = {"id": "s1", "tool": "lookup_order", "args": {"order_id": order}, "why": "status"}
    return {"steps": [step], "answer": "", **extra}


async def _billing_matches(
    pool: AsyncConnectionPool, resp: AgentResponse, servers: list[tuple[Any, str]], *, exact: bool = True
) -> list[tuple[str, str, int, str]]:
    """Every answered call has a committed hold; with usage reported, at exactly its price."""
    rows = await ledger_model_rows(pool, resp.workflow_id)
    answered, with_usage, costs = server_bill(servers)
    committed = [r for r in rows if r[1] == "committed"]
    assert len(committed) == answered, (rows, answered)
    assert all(r[1] in ("committed", "denied") for r in rows), rows  # nothing left held
    ledger_total = sum(r[2] for r in committed)
    if exact:
        assert with_usage == answered
        assert ledger_total == sum(costs)
    else:
        assert ledger_total >= sum(costs)
    model_spend = sum(resp.spend.by_model.values())
    assert model_spend == ledger_total, (resp.spend, rows)
    assert len(resp.calls) == len(rows)
    assert "\n" not in resp.reason
    return rows


async def _run(
    client: Client, pool: AsyncConnectionPool, settings: Settings, tq: str, msg: str
) -> AgentResponse:
    async with running_worker(client, pool, settings, tq):
        return await run_agent(client, tq, request(msg))


# --- OpenAI wire format --------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    ["prose", "fence_in_middle", "wrong_types"],
)
async def test_lenient_where_safe(
    shape: str,
    openai_roles: tuple[FakeOpenAI, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    server, roles = openai_roles
    order = await make_order(db_pool)
    plan = _lookup(order)
    text = {
        "prose": f"Sure! {json.dumps(plan)} Let me know if you need more.",
        "fence_in_middle": f"Here is my plan.\n```json\n{json.dumps(plan)}\n```\nI will look it up.",
        "wrong_types": json.dumps({**plan, "steps": [{**plan["steps"][0], "id": 1}], "replan": "false"}),
    }[shape]
    roles.plans.append(text)
    roles.answers.append(f"Order {order} is shipped.")
    resp = await _run(client, db_pool, temporal_services, task_queue, f"Where is order {order}?")
    assert resp.outcome == "completed", resp.reason
    assert [s.tool for s in resp.steps] == ["lookup_order"]
    assert [role_of(r) for r, _ in server.answered] == ["plan", "eval", "answer"]  # no repair
    assert resp.message == f"Order {order} is shipped."
    await _billing_matches(db_pool, resp, [(server, "openai")])


@pytest.mark.parametrize("shape", ["schema_copy", "empty_object", "wrapper", "endless_invalid"])
async def test_not_a_plan_is_repaired_once_then_refused(
    shape: str,
    openai_roles: tuple[FakeOpenAI, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    server, roles = openai_roles
    order = await make_order(db_pool)
    bad = {
        "schema_copy": Plan.model_output_schema(),
        "empty_object": {},
        "wrapper": {"plan": _lookup(order)},
        "endless_invalid": {"steps": [{"id": "s1", "tool": "drop_database", "args": {}}], "answer": ""},
    }[shape]
    roles.plans.extend([bad, bad, bad, bad])
    resp = await _run(
        client,
        db_pool,
        temporal_services,
        task_queue,
        f"Check if order {order} is shipped and refund it if so",
    )
    assert resp.outcome == "failed" and resp.steps == ()
    assert "plan refused after one repair" in resp.reason, resp.reason
    assert [role_of(r) for r, _ in server.answered] == ["plan", "plan"]  # one repair, no retries
    repair = server.answered[1][0].body["messages"][-1]["content"]
    assert "could not be used" in repair
    await _billing_matches(db_pool, resp, [(server, "openai")])


async def test_wrapper_repaired_into_a_real_plan(
    openai_roles: tuple[FakeOpenAI, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    server, roles = openai_roles
    order = await make_order(db_pool)
    roles.plans.extend([{"plan": _lookup(order)}, _lookup(order)])
    resp = await _run(client, db_pool, temporal_services, task_queue, f"Where is order {order}?")
    assert resp.outcome == "completed", resp.reason
    assert [role_of(r) for r, _ in server.answered] == ["plan", "plan", "eval", "answer"]
    assert "'plan'" in server.answered[1][0].body["messages"][-1]["content"]
    await _billing_matches(db_pool, resp, [(server, "openai")])


async def test_truncated_plan_retried_once_with_a_larger_cap(
    openai_roles: tuple[FakeOpenAI, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    server, roles = openai_roles
    order = await make_order(db_pool)
    cut = json.dumps(_lookup(order))[:40]
    roles.plans.extend([roles.truncated(cut), _lookup(order)])
    resp = await _run(client, db_pool, temporal_services, task_queue, f"Where is order {order}?")
    assert resp.outcome == "completed", resp.reason
    first, second = (r.body for r, _ in server.answered[:2])
    assert second["max_tokens"] == 2 * first["max_tokens"]
    assert all(m["content"] != cut for m in second["messages"])  # never pasted back
    await _billing_matches(db_pool, resp, [(server, "openai")])


async def test_truncated_twice_fails_with_that_reason(
    openai_roles: tuple[FakeOpenAI, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    server, roles = openai_roles
    roles.plans.extend([roles.truncated('{"steps": [{"id"'), roles.truncated('{"steps": [{"id": "s1"')])
    resp = await _run(client, db_pool, temporal_services, task_queue, "Where is order ORD-1?")
    assert resp.outcome == "failed"
    assert "cut at its output cap twice" in resp.reason
    assert len(server.answered) == 2
    await _billing_matches(db_pool, resp, [(server, "openai")])


async def test_zero_step_plan_for_an_actionable_request_is_never_completed(
    openai_roles: tuple[FakeOpenAI, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    server, roles = openai_roles
    order = await make_order(db_pool)
    roles.plans.extend([{"steps": [], "answer": "Done! Refunded."}] * 3)
    resp = await _run(
        client,
        db_pool,
        temporal_services,
        task_queue,
        f"Check if order {order} is shipped and refund it if so",
    )
    assert resp.outcome == "needs_human", resp.reason
    assert f"no step touched {order}" in resp.reason
    assert "escalated_to_powerful" in resp.flags  # the cascade tried the stronger tiers first
    assert "Refunded" not in resp.message
    await _billing_matches(db_pool, resp, [(server, "openai")])


async def test_answer_claiming_an_effect_that_did_not_happen_is_withheld(
    openai_roles: tuple[FakeOpenAI, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    server, roles = openai_roles
    order = await make_order(db_pool, status="processing")
    refund = {
        "id": "s2",
        "tool": "issue_refund",
        "args": {"order_id": order, "amount_usd": "${s1.refundable_usd}", "reason": "asked"},
        "when": {"step": "s1", "field": "shipped", "equals": True},
    }
    roles.plans.append({**_lookup(order), "steps": [*_lookup(order)["steps"], refund]})
    roles.answers.append(f"I have refunded order {order} in full.")
    resp = await _run(
        client,
        db_pool,
        temporal_services,
        task_queue,
        f"Check if order {order} is shipped and refund it if so",
    )
    assert resp.outcome == "needs_human", resp.reason
    assert "answer check" in resp.reason and "issue_refund" in resp.reason
    assert "I have refunded" not in resp.message and "processing" in resp.message
    assert [s.state.value for s in resp.steps] == ["succeeded", "skipped"]
    await _billing_matches(db_pool, resp, [(server, "openai")])


async def test_slow_responses_past_the_timeout_are_charged_their_hold(
    openai_roles: tuple[FakeOpenAI, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, roles = openai_roles
    monkeypatch.setenv("KEEL_MODEL_TIMEOUT_S", "0.4")
    slow = dataclasses.replace(fo.chat(json.dumps(_lookup("ORD-1"))), delay_s=1.2)
    roles.raw.extend([slow] * 6)
    resp = await _run(client, db_pool, temporal_services, task_queue, "Where is order ORD-1?")
    assert resp.outcome == "failed"
    # Three timeouts open the breaker (below the plan's five attempts); no other provider.
    assert "circuit open" in resp.reason or "timed out" in resp.reason, resp.reason
    rows = await _billing_matches(db_pool, resp, [(server, "openai")], exact=False)
    assert len(rows) == 3 and all(r[2] > 0 for r in rows)  # usage unknown: the full hold


# --- Anthropic wire format -----------------------------------------------------------------


async def test_anthropic_sloppy_plan_judge_and_answer(
    anthropic_roles: tuple[FakeAnthropic, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    """Prose instead of the forced tool, a schema copy repaired, a judge, a checked answer."""
    server, roles = anthropic_roles
    order = await make_order(db_pool)
    roles.plans.extend([Plan.model_output_schema(), f"Plan follows. {json.dumps(_lookup(order))}"])
    roles.evals.append({"score": 0.9, "confidence": 0.85, "reason": "looked up as asked"})
    roles.answers.append(f"Order {order} has shipped.")
    resp = await _run(client, db_pool, temporal_services, task_queue, f"Where is order {order}?")
    assert resp.outcome == "completed", resp.reason
    assert [role_of(r) for r, _ in server.answered] == ["plan", "plan", "eval", "answer"]
    assert resp.message == f"Order {order} has shipped."
    assert [c.role for c in resp.calls] == ["plan", "plan", "evaluate", "respond"]
    await _billing_matches(db_pool, resp, [(server, "anthropic")])


async def test_anthropic_judge_low_confidence_hands_to_a_human(
    anthropic_roles: tuple[FakeAnthropic, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    server, roles = anthropic_roles
    order = await make_order(db_pool)
    roles.plans.append(_lookup(order))
    roles.evals.append({"score": "0.9", "confidence": 0.2, "reason": "not sure"})
    resp = await _run(client, db_pool, temporal_services, task_queue, f"Where is order {order}?")
    assert resp.outcome == "needs_human" and "confidence 0.20" in resp.reason
    await _billing_matches(db_pool, resp, [(server, "anthropic")])


# --- the cascade judges plans, not their damage ---------------------------------------------


async def _refunds_of(pool: AsyncConnectionPool, order: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("select count(*) from refunds where order_id = %s", (order,))
        row = await cur.fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("refused_by", ["rules", "judge"])
async def test_cascade_replaces_a_bad_cheap_plan_before_its_side_effect_runs(
    refused_by: str,
    openai_roles: tuple[FakeOpenAI, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    server, roles = openai_roles
    order = await make_order(db_pool, status="shipped", total_usd=30.0)
    other = await make_order(db_pool, status="shipped", total_usd=99.0)
    lookup = _lookup(order)["steps"][0]
    good_refund = {
        "id": "s2",
        "tool": "issue_refund",
        "args": {"order_id": order, "amount_usd": "${s1.refundable_usd}", "reason": "asked"},
        "when": {"step": "s1", "field": "shipped", "equals": True},
    }
    if refused_by == "rules":
        # Refunds unconditionally although the request sets a condition. (A refund of an order
        # the request never named is now the gate's to deny: rule ``named_in_request``.)
        cheap = {
            "steps": [
                {
                    **good_refund,
                    "id": "s1",
                    "args": {**good_refund["args"], "amount_usd": 30.0},
                    "when": None,
                }
            ],
            "answer": "",
        }
    else:  # looks fine to the rules; the judge sees it refunds without checking the amount
        cheap = {
            "steps": [lookup, {**good_refund, "args": {**good_refund["args"], "amount_usd": 30.0}}],
            "answer": "",
        }
        roles.checks.append({"score": 0.1, "confidence": 0.9, "reason": "refund amount not checked"})
    roles.plans.extend([cheap, {"steps": [lookup, good_refund], "answer": ""}])
    roles.answers.append(f"Order {order} had shipped, so I refunded $30.0.")
    # A fresh session: memory from earlier runs would reach the escalated plan, which would
    # then be untrusted (issue 17's provenance) and its refund would wait for a human.
    req = request(f"Check if order {order} is shipped and refund it if so", session=f"s-{order}")
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, req)
        history = await client.get_workflow_handle(resp.workflow_id).fetch_history()
    await _replayer().replay_workflow(history)  # the new shape is deterministic
    if refused_by == "judge" and os.environ.get("KEEL_RECORD_HISTORIES") == "1":
        GOLDEN.write_text(history.to_json())
    assert resp.outcome == "completed", resp.reason
    assert "plan_refused" in resp.flags and "escalated_to_balanced" in resp.flags
    assert [s.tool for s in resp.steps] == ["lookup_order", "issue_refund"]  # the good plan only
    assert await _refunds_of(db_pool, other) == 0 and await _refunds_of(db_pool, order) == 1
    plans = [r.body["model"] for r, _ in server.answered if role_of(r) == "plan"]
    assert plans == ["gpt-4o-mini", "gpt-4.1-mini"]
    assert resp.message == f"Order {order} had shipped, so I refunded $30.0."  # one answer
    await _billing_matches(db_pool, resp, [(server, "openai")])


async def test_golden_model_run_history_replays() -> None:
    """A run recorded with holds in the activities, a judge refusing the cheap plan, the
    escalated plan, evaluation and a model-written answer (re-record: KEEL_RECORD_HISTORIES=1)."""
    assert GOLDEN.exists(), f"missing golden history {GOLDEN}"
    await _replayer().replay_workflow(WorkflowHistory.from_json("golden-model-run", GOLDEN.read_text()))


def _replayer() -> Replayer:
    """Through the session's payload codec (the golden file predates encryption and replays
    through its pass-through; fresh histories are sealed under the test key)."""
    keys = parse_keys(TEST_CODEC_KEYS, "tests/histories/codec-test.keys")
    return Replayer(workflows=[AgentWorkflow], data_converter=data_converter(keys))


# --- failover inside the run that meets the outage ------------------------------------------


async def test_failover_happens_in_the_first_run_and_is_priced_and_shown(
    anthropic_roles: tuple[FakeAnthropic, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    primary, down = anthropic_roles
    down.raw.extend([fa_error(529)] * 50)  # Anthropic is overloaded for the whole test
    roles = Roles()
    backup = FakeOpenAI(responder=roles).start()
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-000000000000")
        monkeypatch.setenv("OPENAI_BASE_URL", backup.url + "/v1")
        order = await make_order(db_pool)
        roles.plans.append(_lookup(order))
        resp = await _run(client, db_pool, temporal_services, task_queue, f"Where is order {order}?")
    finally:
        backup.stop()
    assert resp.outcome == "completed", resp.reason
    assert len(primary.answered) == 3  # the breaker opened below the plan's five attempts
    moved = [c for c in resp.calls if c.fallback_from]
    assert moved and all(c.fallback_from == "anthropic:claude-haiku-4-5" for c in moved)
    assert moved[0].model == "openai:gpt-4o-mini"
    assert "failover from anthropic:claude-haiku-4-5" in resp.model_label
    assert "failover:anthropic:claude-haiku-4-5->openai:gpt-4o-mini" in resp.flags
    rows = await _billing_matches(db_pool, resp, [(primary, "anthropic"), (backup, "openai")], exact=False)
    # The fallback's hold was priced for (and charged to) the model that answered.
    assert {r[3] for r in rows} == {"anthropic:claude-haiku-4-5", "openai:gpt-4o-mini"}
    async with db_pool.connection() as conn:
        cur = await conn.execute(
            "select scopes from keel_budget_reservations where run_id = %s and subject = %s",
            (resp.workflow_id, "openai:gpt-4o-mini"),
        )
        scopes = [r[0] for r in await cur.fetchall()]
    assert scopes and all("acme/model:openai:gpt-4o-mini" in s for s in scopes)


def fa_error(status: int) -> Any:
    from tests.providers.fake_anthropic import error

    return error(status, "overloaded_error", "Overloaded")


async def test_anthropic_max_tokens_retried_larger_and_wrong_types_coerced(
    anthropic_roles: tuple[FakeAnthropic, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    server, roles = anthropic_roles
    order = await make_order(db_pool)
    plan = _lookup(order)
    roles.plans.extend(
        [roles.truncated(json.dumps(plan)[:30]), {**plan, "steps": [{**plan["steps"][0], "id": 7}]}]
    )
    resp = await _run(client, db_pool, temporal_services, task_queue, f"Where is order {order}?")
    assert resp.outcome == "completed", resp.reason
    assert [s.id for s in resp.steps] == ["7"]
    first, second = (r.body for r, _ in server.answered[:2])
    assert second["max_tokens"] == 2 * first["max_tokens"]
    await _billing_matches(db_pool, resp, [(server, "anthropic")])
