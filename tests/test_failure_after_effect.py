"""A failure after an effect, and NUL characters where a run ends (issue 15, items 2 and 3).

The issue's case: lookup, refund $10, then a step whose arguments fail the tool's schema.
Before, ``run_tool`` refused the arguments before any hold existed, ``settle_step`` tried to
release a hold never placed, the ledger refused, and the workflow FAILED with the refund
standing, no compensation, no finish row and the run slot taken. The promise now: no
workflow failure; the bad step is a failed step with an audit row; the run ends through
the one exit (finish row, slot freed, no hold open) and reported spend equals the ledger.
"""

from __future__ import annotations

from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from keel.models import StepState
from keel.settings import Settings
from tests.doubles.models import step
from tests.ending import assert_one_exit
from tests.helpers import make_order
from tests.scripted import plan, scripted_worker, start, write_policy


async def _rows(pool: AsyncConnectionPool, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        return await (await conn.execute(sql, args)).fetchall()


async def _refunds(pool: AsyncConnectionPool, wid: str) -> list[tuple[Any, ...]]:
    return await _rows(
        pool,
        "select amount_micros, status from refunds where idempotency_key like %s order by id",
        f"{wid}/%",
    )


async def _ok_effects(pool: AsyncConnectionPool, wid: str) -> set[str]:
    rows = await _rows(
        pool, "select idempotency_key from tool_effects where idempotency_key like %s and ok", f"{wid}/%"
    )
    return {k[len(wid) + 1 :] for (k,) in rows}


@pytest.mark.parametrize(
    "bad",
    [
        {"tool": "send_email", "args": {"to": ["x@example.com"], "subject": "s", "body": "b"}},
        {"tool": "send_email", "args": {"to": {"addr": "x@example.com"}, "subject": "s", "body": "b"}},
        {"tool": "issue_refund", "args": {"order_id": "ORD-1", "amount_usd": "ten"}},
        {"tool": "issue_refund", "args": {"order_id": "ORD-1", "amount_usd": 10**400}},
        {"tool": "test_effect", "args": {"note": ["a", "list"]}},
    ],
    ids=["email-to-list", "email-to-dict", "refund-amount-word", "refund-amount-huge", "effect-note-list"],
)
async def test_schema_failure_after_a_refund_is_a_failed_step_and_the_run_ends_cleanly(
    bad: dict[str, Any],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order = await make_order(db_pool, total_usd=50.0)
    plans = [
        plan(
            step("s1", "lookup_order", order_id=order),
            step("s2", "issue_refund", order_id=order, amount_usd=10.0, reason="late"),
            step("s3", bad["tool"], **bad["args"]),
        ),
        plan(answer="Refunded; the follow-up could not be done."),  # the planner's second look
    ]
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        plans,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        handle = await start(client, task_queue)
        resp = await handle.result()  # no WorkflowFailureError: the run answered
    wid = resp.workflow_id
    states = {s.id: s.state for s in resp.steps}
    assert states["s1"] == StepState.SUCCEEDED and states["s3"] == StepState.FAILED, resp.steps
    s3 = next(s for s in resp.steps if s.id == "s3")
    assert "invalid arguments" in s3.error or "not a number" in s3.error, s3
    assert "\n" not in s3.error
    assert resp.outcome in ("partial", "completed", "escape_hatch"), (resp.outcome, resp.reason)
    assert "internal_error" not in resp.flags and "cleanup_failed" not in resp.flags, resp.flags
    # The refund is either standing and reported succeeded, or undone and reported so.
    refunds = await _refunds(db_pool, wid)
    assert len(refunds) == 1 and refunds[0][0] == 10_000_000, refunds
    assert (refunds[0][1], states["s2"]) in (
        ("issued", StepState.SUCCEEDED),
        ("voided", StepState.COMPENSATED),
    ), (refunds, states)
    # Every recorded effect is a step the run reports as done or undone, never a failed one.
    for key in await _ok_effects(db_pool, wid):
        sid = key.split("/", 1)[0]
        assert states.get(sid) in (StepState.SUCCEEDED, StepState.COMPENSATED), (key, states)
    # The bad step left an audit row saying it failed.
    audit = await _rows(
        db_pool,
        "select kind, decision, reason from audit_log where workflow_id = %s and step_id = 's3'",
        wid,
    )
    assert any(d == "failed" for _, d, _ in audit), audit
    await assert_one_exit(db_pool, handle, resp)


async def test_nul_in_tool_arguments_is_a_denied_step_and_the_saga_runs(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order = await make_order(db_pool, total_usd=50.0)
    plans = [
        plan(
            step("s1", "issue_refund", order_id=order, amount_usd=10.0, reason="late"),
            step("s2", "send_email", to="alice@example.com", subject="Refund\x00", body="done\x00"),
        )
    ]
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        plans,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        handle = await start(client, task_queue)
        resp = await handle.result()
    wid = resp.workflow_id
    assert resp.outcome == "denied", (resp.outcome, resp.reason)
    assert "NUL" in resp.reason and "\x00" not in resp.reason, resp.reason
    assert resp.compensated == ("s1",)
    assert await _refunds(db_pool, wid) == [(10_000_000, "voided")]
    denial = await _rows(
        db_pool,
        "select decision, data->>'rule' from audit_log where workflow_id=%s and step_id='s2' "
        "and kind='permission'",
        wid,
    )
    assert denial == [("deny", "unjudgeable_arguments")], denial
    await assert_one_exit(db_pool, handle, resp)


@pytest.mark.parametrize(
    "where",
    ["answer", "why", "tool-name", "step-id-denied", "step-id-allowed"],
)
async def test_nul_in_model_output_does_not_break_the_ending(
    where: str,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model's plan is untrusted text: a NUL in its answer, a step's ``why``, a tool name or
    a step id must not make ``finish_run`` (or any audit write) fail forever."""
    from keel.models import PlanStep

    steps = {
        "answer": [],
        "why": [PlanStep(id="s1", tool="echo", args={"note": "hi"}, why="because\x00")],
        "tool-name": [PlanStep(id="s1", tool="echo\x00", args={"note": "hi"})],
        "step-id-denied": [PlanStep(id="s1\x00", tool="echo", args={"note": "NOT ALLOWED"})],
        "step-id-allowed": [PlanStep(id="s1\x00", tool="echo", args={"note": "hi"})],
    }[where]
    plans = [plan(*steps, answer="All done\x00 here."), plan(answer="All done\x00 here.")]
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        plans,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        handle = await start(client, task_queue)
        resp = await handle.result()
    assert "internal_error" not in resp.flags and "cleanup_failed" not in resp.flags, (
        resp.flags,
        resp.reason,
    )
    await assert_one_exit(db_pool, handle, resp)
    memory = await _rows(db_pool, "select content from memory_turns where workflow_id = %s", resp.workflow_id)
    assert memory or resp.outcome == "denied", memory
    assert all("\x00" not in c for (c,) in memory)


async def test_a_ledger_refusal_after_an_effect_ends_through_the_one_exit(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ledger refuses the second plan's admission (its step's hold key was taken by a
    different request: IdempotencyConflict, non-retryable). A local activity's failure reaches
    workflow code as a bare ApplicationError; it must end the run like any activity failure —
    the effect undone, the finish row, the slot — and complete with outcome ``failed``, not
    fail the workflow as an internal error."""
    from keel.activities import ledger
    from keel.budget import ReleaseRequest, ReserveRequest
    from tests.helpers import request
    from tests.scripted import effects_of

    req = request("record an effect, then plan again")
    wid = f"agent/{req.tenant}/{req.request_id}"
    squatter = f"{wid}/s2/reserve"
    async with db_pool.connection() as conn:
        await ledger.reserve(
            conn, ReserveRequest(key=squatter, scopes=("acme",), amount_micros=7, kind="model")
        )
    plans = [
        plan(step("s1", "test_effect", note="undo me"), replan=True),
        plan(step("s2", "test_effect", note="never")),
    ]
    try:
        async with scripted_worker(
            client,
            db_pool,
            temporal_services,
            task_queue,
            plans,
            policy_file=write_policy(tmp_path),
            monkeypatch=monkeypatch,
        ):
            handle = await start(client, task_queue, req)
            resp = await handle.result()  # completes: a ledger refusal is not an internal error
    finally:
        async with db_pool.connection() as conn:
            await ledger.release(conn, ReleaseRequest(key=squatter, reason="test cleanup"))
    assert resp.outcome == "failed", (resp.outcome, resp.reason)
    assert "IdempotencyConflict" in resp.reason or "already used" in resp.reason, resp.reason
    assert "internal_error" not in resp.flags, resp.flags
    assert resp.compensated == ("s1",)
    assert await effects_of(db_pool, wid) == [("s1", "test_effect", "undo me", "undone")]
    await assert_one_exit(db_pool, handle, resp)
