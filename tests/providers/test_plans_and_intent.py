"""A plan is real or refused, JSON is found where it safely can be, and the intent rules."""

from __future__ import annotations

import json

import pytest

from keel.activities.agent import _check_plan, _check_verdict
from keel.activities.models.errors import parse_structured
from keel.intent import claimed_effects, intent_of, plan_problems, unaddressed
from keel.models import Plan

TOOLS = {"lookup_order", "issue_refund", "send_email"}
SCHEMA = Plan.model_output_schema()


def _refused(data: object) -> str:
    with pytest.raises(ValueError) as info:
        _check_plan(data if isinstance(data, dict) else None, "no JSON", TOOLS)
    return str(info.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({}, "missing required field(s) steps, answer"),
        ({"plan": {"steps": [], "answer": "x"}}, "'plan' instead"),
        (SCHEMA, "instead"),
        ({"steps": [], "answer": ""}, "non-empty 'answer'"),
        ({"steps": [], "answer": "   "}, "non-empty 'answer'"),
        ({"steps": [{"id": "s1", "tool": "lookup_order"}], "answer": ""}, "missing required field(s) args"),
        ({"steps": [], "answer": "x", "confidence": 1}, "Extra inputs are not permitted"),
        ({"steps": [{"id": "s1", "tool": "lookup_order", "args": {}, "extra": 1}], "answer": ""}, "extra"),
        ({"steps": "all of them", "answer": ""}, "steps"),
        ({"steps": [{"id": "s1", "tool": "rm_rf", "args": {}}], "answer": ""}, "unknown or unavailable"),
    ],
)
def test_not_a_plan_is_refused_with_a_reason(data: dict, reason: str) -> None:
    assert reason in _refused(data)


def test_lax_scalars_are_coerced() -> None:
    plan = _check_plan(
        {
            "steps": [{"id": 1, "tool": "lookup_order", "args": {"order_id": "ORD-1"}}],
            "answer": "",
            "replan": "no",
        },
        "",
        TOOLS,
    )
    assert plan.steps[0].id == "1" and plan.replan is False


def test_code_may_still_build_plans_with_defaults() -> None:
    assert Plan().steps == () and Plan(answer="hi").answer == "hi"
    assert SCHEMA["required"] == ["steps", "answer"]
    assert SCHEMA["$defs"]["PlanStep"]["required"] == ["id", "tool", "args"]
    assert SCHEMA["additionalProperties"] is False


@pytest.mark.parametrize(
    "text",
    [
        '{"steps": [], "answer": "a"}',
        'Here you go: {"steps": [], "answer": "a"} -- done',
        'Plan:\n```json\n{"steps": [], "answer": "a"}\n```\nthanks',
        'Plan:\n```\n{"steps": [], "answer": "a"}\n```',
        'x {not json} then {"steps": [], "answer": "a"}',
    ],
)
def test_json_is_found_in_prose_and_fences_anywhere(text: str) -> None:
    assert parse_structured(text, SCHEMA) == {"steps": [], "answer": "a"}


@pytest.mark.parametrize("text", ["", "no json at all", '{"steps": [', "[1, 2]", "{" * 500])
def test_no_object_is_an_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_structured(text, SCHEMA)


def test_verdicts_are_numbers_in_range() -> None:
    assert _check_verdict({"score": "0.5", "confidence": 1}, "")["score"] == 0.5
    for bad in ({"score": 2, "confidence": 0.5}, {"score": "high", "confidence": 0.5}, {"score": 0.5}):
        with pytest.raises(ValueError):
            _check_verdict(bad, "")


def test_intent_of_a_request() -> None:
    intent = intent_of("Check if order ORD-123 is shipped and refund it if so")
    assert intent.ids == ("ORD-123",) and intent.conditional and intent.actionable
    assert set(intent.actions) >= {"issue_refund", "lookup_order"}
    assert not intent_of("What can you do?").actionable
    assert intent_of("ORD-9?").actionable  # naming an order asks about it


def test_unaddressed_means_no_step_touched_what_was_named() -> None:
    msg = "Check if order ORD-123 is shipped and refund it if so"
    assert "no step touched ORD-123" in unaddressed(msg, [])
    other = [{"tool": "lookup_order", "args": {"order_id": "ORD-9"}, "state": "succeeded"}]
    assert "ORD-123" in unaddressed(msg, other)
    skipped = [{"tool": "lookup_order", "args": {"order_id": "ORD-123"}, "state": "skipped"}]
    assert unaddressed(msg, skipped)
    done = [{"tool": "lookup_order", "args": {"order_id": "ORD-123"}, "state": "succeeded"}]
    assert unaddressed(msg, done) == ""
    assert unaddressed("Hello there", []) == ""


def test_plan_problems_before_side_effects() -> None:
    msg = "Check if order ORD-123 is shipped and refund it if so"
    writes = {"issue_refund", "send_email"}
    lookup = {"id": "s1", "tool": "lookup_order", "args": {"order_id": "ORD-123"}}
    refund = {"id": "s2", "tool": "issue_refund", "args": {"order_id": "ORD-123", "amount_usd": 5}}
    guarded = {**refund, "when": {"step": "s1", "field": "shipped", "equals": True}}
    assert "unconditionally" in plan_problems(msg, [lookup, refund], writes)
    assert plan_problems(msg, [lookup, guarded], writes) == ""
    stray = {**guarded, "args": {"order_id": "ORD-999", "amount_usd": 5}}
    assert "ORD-999, which the request does not name" in plan_problems(msg, [lookup, stray], writes)
    email = {"id": "s3", "tool": "send_email", "args": {"to": "a@example.com"}, "when": {"step": "s1"}}
    assert "does not ask for" in plan_problems(msg, [lookup, guarded, email], writes)


def test_claimed_effects_must_have_happened() -> None:
    ran = [{"tool": "lookup_order", "state": "succeeded"}, {"tool": "issue_refund", "state": "skipped"}]
    assert "issue_refund" in claimed_effects("I have refunded the order.", ran)
    assert "send_email" in claimed_effects("We e-mailed the customer.", ran)
    assert claimed_effects("The order is processing, so no refund was made.", ran) == ""
    assert claimed_effects("It has not shipped. I refunded it anyway.", ran)
    refunded = [*ran, {"tool": "issue_refund", "state": "succeeded"}]
    assert claimed_effects("I have refunded the order.", refunded) == ""
    assert json.dumps(ran)  # views are plain data
