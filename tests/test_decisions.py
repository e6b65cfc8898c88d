"""The pure escape-hatch logic in ``keel.decisions`` (no services needed)."""

from __future__ import annotations

import pytest

from keel import decisions as d

LIMITS = d.Limits(max_tool_calls=5, max_consecutive_failures=3, thrash_repeats=3)


def test_no_hatch_while_within_limits() -> None:
    assert (
        d.escape_hatch(
            LIMITS, tool_calls=4, consecutive_failures=2, signatures=["a:{}", "a:{}"], next_signature="a:{}"
        )
        is None
    )


@pytest.mark.parametrize(
    ("kw", "prefix"),
    [
        ({"tool_calls": 5, "consecutive_failures": 0, "signatures": []}, "tool_call_cap:"),
        ({"tool_calls": 1, "consecutive_failures": 3, "signatures": []}, "error_cascade:"),
        (
            {
                "tool_calls": 3,
                "consecutive_failures": 0,
                "signatures": ["a:{}"] * 3,
                "next_signature": "a:{}",
            },
            "thrashing:",
        ),
    ],
)
def test_each_hatch_names_itself(kw: dict, prefix: str) -> None:
    reason = d.escape_hatch(LIMITS, **kw)
    assert reason is not None and reason.startswith(prefix)


def test_cap_wins_over_cascade_and_thrashing() -> None:
    reason = d.escape_hatch(
        LIMITS, tool_calls=5, consecutive_failures=9, signatures=["a:{}"] * 9, next_signature="a:{}"
    )
    assert reason is not None and reason.startswith("tool_call_cap")


def test_call_signature_ignores_argument_order() -> None:
    assert d.call_signature("t", {"a": 1, "b": 2}) == d.call_signature("t", {"b": 2, "a": 1})
    assert d.call_signature("t", {"a": 1}) != d.call_signature("t", {"a": 2})


def test_rule_score_ignores_skipped_steps() -> None:
    assert d.rule_score(["succeeded", "skipped", "failed"]) == 0.5
    assert d.rule_score(["skipped"]) == 1.0


def test_resolve_args_keeps_types_and_rejects_unknown_references() -> None:
    results = {"s1": {"total_usd": 42.5, "email": "a@example.com"}}
    assert d.resolve_args({"amount": "${s1.total_usd}", "to": "x ${s1.email}"}, results) == {
        "amount": 42.5,
        "to": "x a@example.com",
    }
    with pytest.raises(d.ReferenceError_):
        d.resolve_args({"amount": "${s2.total_usd}"}, results)


def test_condition_holds() -> None:
    results = {"s1": {"shipped": True}}
    assert d.condition_holds({"step": "s1", "field": "shipped", "equals": True}, results)
    assert not d.condition_holds({"step": "s1", "field": "shipped", "not_equals": True}, results)
    assert not d.condition_holds({"step": "s9", "field": "shipped", "equals": True}, results)
    assert d.condition_holds(None, results)
