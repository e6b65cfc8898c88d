"""Data-flow labels and provenance in the pure core (issue 17): unit tests of keel.labels and
of the gate rules that read them, against the shipped policy and the real tool registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from keel.activities.tools.loader import catalog
from keel.gate import GateDecision, check_tool_call
from keel.labels import (
    ExecutedCall,
    Flow,
    Label,
    StepProvenance,
    label_args,
    label_result,
    named_in,
    parse_address,
    step_provenance,
)
from keel.policy import load_policy

TOOLS = {t.name: t for t in catalog(include_hidden=True)}
POLICY = load_policy(Path(__file__).parent.parent / "config" / "policy.yaml", tuple(TOOLS.values()))

ALICE = {"order_id": "ORD-1", "customer_email": "alice@example.com", "total_usd": 42.5, "status": "shipped"}
BOB = {"order_id": "ORD-2", "customer_email": "bob@example.com", "total_usd": 19.99, "status": "processing"}
REQUEST = "What is the status of ORD-1 and ORD-2?"


def _labels_of(results: dict[str, dict[str, Any]], tools: dict[str, str]) -> dict[str, Label]:
    out: dict[str, Label] = {}
    for sid, data in results.items():
        arg = {"order_id": data["order_id"]}
        out[sid] = label_result(
            sid,
            tools[sid],
            data,
            label_args(arg, arg, plan=1, request=REQUEST, results={}, result_labels={}),
        )
    return out


RESULTS = {"s1": ALICE, "s2": BOB}
LABELS = _labels_of(RESULTS, {"s1": "lookup_order", "s2": "lookup_order"})


def _gate(
    tool: str, raw: dict[str, Any], *, plan: int = 1, request: str = REQUEST, **flow: Any
) -> GateDecision:
    from keel.decisions import call_signature, resolve_args

    args = resolve_args(raw, RESULTS)
    labels = label_args(raw, args, plan=plan, request=request, results=RESULTS, result_labels=LABELS)
    prov = step_provenance(plan, tool, TOOLS[tool].side_effects, call_signature(tool, args), ())
    return check_tool_call(
        POLICY,
        "acme",
        "alice",
        (),
        TOOLS[tool],
        args,
        {"order_customer": ["alice@example.com", "bob@example.com"]},
        Flow(request=request, labels=labels, provenance=prov, **flow),
    )


def test_a_result_is_about_its_customer_and_keeps_its_step() -> None:
    assert LABELS["s1"].customers == ("alice@example.com",)
    assert LABELS["s1"].sources == ("s1:lookup_order",)


def test_references_keep_their_labels_and_literals_copying_results_are_tainted() -> None:
    raw = {"to": "${s2.customer_email}", "body": "Total ${s1.total_usd}", "subject": "Hi"}
    args = {"to": BOB["customer_email"], "body": "Total 42.5", "subject": "Hi"}
    lab = label_args(raw, args, plan=2, request=REQUEST, results=RESULTS, result_labels=LABELS)
    assert lab["to"].customers == ("bob@example.com",) and "s2:lookup_order" in lab["to"].sources
    assert lab["body"].customers == ("alice@example.com",) and "plan2" in lab["body"].sources
    assert lab["subject"].customers == () and lab["subject"].sources == ("plan2",)
    # The model copies the value instead of referencing it: the same label.
    copied = {"body": "alice@example.com bought a mug"}
    lab = label_args(copied, copied, plan=2, request=REQUEST, results=RESULTS, result_labels=LABELS)
    assert lab["body"].customers == ("alice@example.com",)


def test_named_in_request_is_a_whole_token_match() -> None:
    assert named_in("refund ORD-12 please", "ORD-12")
    assert not named_in("refund ORD-123 please", "ORD-12")
    assert not named_in("refund ORD-12 please", "ORD-123")
    assert not named_in("refund ORD-12", "")
    assert named_in("mail Alice@Example.com", "alice@example.com")


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("alice@example.com", True),
        ("attacker%evil.test@example.com", False),
        ("evil.test!attacker@example.com", False),
        ('"x@evil.test"@example.com', False),
        ("Bob <bob@example.com>", False),
        ("bob@example.com, eve@evil.test", False),
        ("bob@example.com\nbcc: eve@evil.test", False),
    ],
)
def test_addresses_are_parsed_and_routing_characters_refused(address: str, ok: bool) -> None:
    assert isinstance(parse_address(address), tuple) is ok


def test_email_carrying_another_customers_data_is_denied() -> None:
    """The issue's case: to ${s2.customer_email}, body with s1's e-mail and total."""
    d = _gate(
        "send_email",
        {"to": "${s2.customer_email}", "subject": "Order", "body": "${s1.customer_email} ${s1.total_usd}"},
    )
    assert not d.allowed and d.rule == "email-body-data" and "alice@example.com" in d.reason


def test_email_to_staff_with_customer_data_is_denied() -> None:
    d = _gate("send_email", {"to": "support@example.com", "subject": "fyi", "body": "Order ${s1.order_id}"})
    assert not d.allowed and d.rule == "email-body-data"


def test_email_about_its_own_recipient_is_allowed() -> None:
    d = _gate(
        "send_email",
        {"to": "${s1.customer_email}", "subject": "Your order", "body": "ORD-1 is ${s1.status}"},
    )
    assert d.allowed and not d.needs_approval, d


def test_percent_hack_is_denied_by_the_domain_rule() -> None:
    d = _gate("send_email", {"to": "attacker%evil.test@example.com", "subject": "s", "body": "b"})
    assert not d.allowed and d.rule == "email-recipient" and "routing" in d.reason


def test_refund_of_an_order_the_request_did_not_name_is_denied() -> None:
    d = _gate("issue_refund", {"order_id": "ORD-9", "amount_usd": 5}, prior={"issue_refund|order|ORD-9": 0})
    assert not d.allowed and d.rule == "refund-order-named"
    ok = _gate(
        "issue_refund", {"order_id": "${s1.order_id}", "amount_usd": 5}, prior={"issue_refund|order|ORD-1": 0}
    )
    assert ok.allowed and not ok.needs_approval, ok


def test_split_refunds_add_up_per_order_across_steps_and_runs() -> None:
    prior = {"issue_refund|order|ORD-1": 0.0}
    first = _gate("issue_refund", {"order_id": "ORD-1", "amount_usd": 100}, prior=prior)
    assert first.allowed and not first.needs_approval
    done = (ExecutedCall(tool="issue_refund", args={"order_id": "ORD-1", "amount_usd": 100}),)
    second = _gate("issue_refund", {"order_id": "ORD-1", "amount_usd": 100}, prior=prior, executed=done)
    assert second.needs_approval and second.rule == "refund-order-total" and second.amount == 200
    # An earlier run refunded 450 on the order (the sum comes from the database).
    later = _gate(
        "issue_refund", {"order_id": "ORD-1", "amount_usd": 60}, prior={"issue_refund|order|ORD-1": 450}
    )
    assert not later.allowed and later.rule == "refund-order-total" and "510" in later.reason


def test_per_run_total_spans_orders() -> None:
    prior = {"issue_refund|order|ORD-1": 0.0, "issue_refund|order|ORD-2": 0.0}
    done = (ExecutedCall(tool="issue_refund", args={"order_id": "ORD-1", "amount_usd": 60}),)
    d = _gate("issue_refund", {"order_id": "ORD-2", "amount_usd": 60}, prior=prior, executed=done)
    assert d.needs_approval and d.rule == "refund-run-total"


def test_unknown_earlier_sum_asks_a_human() -> None:
    d = _gate("issue_refund", {"order_id": "ORD-1", "amount_usd": 5})
    assert d.needs_approval and d.rule == "refund-order-total" and "unknown" in d.reason


def test_later_plan_side_effect_needs_approval_but_reads_run_freely() -> None:
    prior = {"issue_refund|order|ORD-1": 0.0}
    d = _gate("issue_refund", {"order_id": "ORD-1", "amount_usd": 5}, plan=2, prior=prior)
    assert d.allowed and d.needs_approval and d.rule == "untrusted-side-effect"
    assert d.provenance.startswith("untrusted: side effect added by plan 2")
    read = _gate("lookup_order", {"order_id": "ORD-1"}, plan=2)
    assert read.allowed and not read.needs_approval and read.provenance == "trusted"


def test_policy_can_deny_untrusted_side_effects() -> None:
    policy = POLICY.model_copy(
        update={"provenance": POLICY.provenance.model_copy(update={"untrusted_side_effects": "deny"})}
    )
    d = check_tool_call(
        policy,
        "acme",
        "alice",
        (),
        TOOLS["issue_refund"],
        {"order_id": "ORD-1", "amount_usd": 5},
        {},
        Flow(
            request=REQUEST,
            provenance=StepProvenance(plan=2, trusted=False, why="added by plan 2"),
            prior={"issue_refund|order|ORD-1": 0},
        ),
    )
    assert not d.allowed and d.rule == "untrusted-side-effect"


def test_a_later_plan_repeating_a_trusted_step_is_trusted() -> None:
    sig = 'issue_refund:{"amount_usd": 5, "order_id": "ORD-1"}'
    p = step_provenance(2, "issue_refund", True, sig, [("issue_refund", sig)])
    assert p.trusted and "repeats" in p.why
    assert not step_provenance(
        2, "issue_refund", True, sig.replace("5", "50"), [("issue_refund", sig)]
    ).trusted


def test_label_rules_fail_closed_without_a_flow() -> None:
    d = check_tool_call(
        POLICY, "acme", "alice", (), TOOLS["issue_refund"], {"order_id": "ORD-1", "amount_usd": 5}, {}
    )
    assert not d.allowed and d.rule == "refund-order-named" and "fail closed" in d.reason
