"""The permissions gate at its three levels, against the shipped policy plus a test policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import keel.gate as gate_mod
from keel.gate import authorize_user, check_tool_call, visible_tools
from keel.labels import Flow
from keel.models import ToolInfo
from keel.policy import load_policy, parse_policy

POLICY = load_policy(Path(__file__).parent.parent / "config" / "policy.yaml")

TOOLS = {
    t.name: t
    for t in (
        ToolInfo(name="lookup_order", description="", permissions=("orders:read",)),
        ToolInfo(name="check_inventory", description="", permissions=("inventory:read",)),
        ToolInfo(
            name="issue_refund",
            description="",
            permissions=("refunds:write",),
            side_effects=True,
            compensation="void_refund",
            risk="high",
        ),
        ToolInfo(name="void_refund", description="", permissions=("refunds:write",)),
        ToolInfo(
            name="send_email",
            description="",
            permissions=("email:send",),
            idempotent=False,
            side_effects=True,
        ),
        ToolInfo(name="run_shell", description="", permissions=("shell:run",)),
    )
}
CUSTOMER = {"order_customer": "alice@example.com"}


def _call(
    tool: str | None,
    args: dict,
    *,
    user: str = "alice",
    perms: tuple[str, ...] = (),
    context: dict | None = None,
    flow: Flow | None = None,
    tenant: str = "acme",
    policy=POLICY,
):  # type: ignore[no-untyped-def]
    return check_tool_call(
        policy,
        tenant,
        user,
        perms,
        TOOLS.get(tool) if tool else None,
        args,
        CUSTOMER if context is None else context,
        TRUSTED if flow is None else flow,
    )


# A first-plan call whose request named these orders, none refunded before.
TRUSTED = Flow(
    request="please handle ORD-123, ORD-125 and ORD-126",
    prior={f"issue_refund|order|ORD-{n}": 0.0 for n in (123, 125, 126)},
)


def test_exports() -> None:
    assert set(gate_mod.__all__) >= {
        "GateDecision",
        "authorize_user",
        "visible_tools",
        "check_tool_call",
    }


def test_gate_module_imports_only_deterministic_code() -> None:
    src = Path(gate_mod.__file__).read_text()
    imports = {line.split()[1] for line in src.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {
        "__future__",
        "functools",
        "keel.labels",
        "math",
        "re",
        "collections.abc",
        "typing",
        "keel.models",
        "keel.policy",
    }


# Level 1: who may run the agent.
@pytest.mark.parametrize(
    ("tenant", "user", "allowed", "rule"),
    [
        ("acme", "alice", True, "user-allowed"),
        ("acme", "bob", True, "user-allowed"),
        ("acme", "mallory", False, "user-not-allowed"),
        ("globex", "anyone", True, "user-allowed"),
        ("initech", "alice", False, "tenant-unknown"),
    ],
)
def test_authorize_user(tenant: str, user: str, allowed: bool, rule: str) -> None:
    d = authorize_user(POLICY, tenant, user, ())
    assert (d.allowed, d.rule) == (allowed, rule) and d.reason


def test_effective_permissions_are_granted_by_default() -> None:
    d = authorize_user(POLICY, "acme", "alice", ())
    assert d.effective_permissions == (
        "code:run",
        "email:send",
        "inventory:read",
        "orders:read",
        "refunds:write",
    )
    assert authorize_user(POLICY, "globex", "x", ()).effective_permissions == (
        "inventory:read",
        "orders:read",
    )


def test_requested_permissions_only_narrow() -> None:
    d = authorize_user(POLICY, "acme", "alice", ("orders:read",))
    assert d.effective_permissions == ("orders:read",)


def test_caller_cannot_grant_itself_permissions() -> None:
    d = authorize_user(POLICY, "acme", "bob", ("orders:read", "refunds:write", "admin:*"))
    assert d.allowed and d.effective_permissions == ("orders:read",)
    assert "refunds:write" in d.reason and "admin:*" in d.reason
    refund = _call(
        "issue_refund",
        {"order_id": "ORD-123", "amount_usd": 10},
        user="bob",
        perms=("refunds:write", "orders:read"),
    )
    assert not refund.allowed and refund.rule == "tool-permission" and "refunds:write" in refund.reason


# Level 2: tools hidden before planning.
def test_visible_tools_per_user() -> None:
    names = lambda ts: {t.name for t in ts}  # noqa: E731
    tools = list(TOOLS.values())
    alice = names(visible_tools(POLICY, "acme", "alice", (), tools))
    assert alice == {"lookup_order", "check_inventory", "issue_refund", "void_refund", "send_email"}
    assert names(visible_tools(POLICY, "acme", "bob", (), tools)) == {
        "lookup_order",
        "check_inventory",
    }
    assert names(visible_tools(POLICY, "acme", "alice", ("orders:read",), tools)) == {"lookup_order"}
    assert visible_tools(POLICY, "acme", "mallory", (), tools) == ()
    assert "run_shell" not in alice  # it needs shell:run, granted to no one


def test_acl_override_adds_permissions() -> None:
    d = _call("issue_refund", {"order_id": "ORD-123", "amount_usd": 10}, perms=("refunds:write",))
    assert not d.allowed and d.rule == "tool-permission" and "orders:read" in d.reason


# Level 3: each call re-checked with its arguments.
def test_unknown_tool_denied() -> None:
    d = _call(None, {"x": 1})
    assert not d.allowed and d.rule == "unknown-tool"


def test_small_refund_allowed() -> None:
    d = _call("issue_refund", {"order_id": "ORD-123", "amount_usd": 40, "reason": "broken"})
    assert d.allowed and not d.needs_approval and d.rule == "allow"


@pytest.mark.parametrize(
    ("amount", "rule"),
    [
        (500.01, "refund-hard-limit"),
        (10_000, "refund-hard-limit"),
        ("900", "refund-hard-limit"),
        (0, "refund-positive"),
        (-5, "refund-positive"),
        ("lots", "refund-positive"),
        (float("nan"), "refund-positive"),
        (True, "refund-positive"),
        (None, "refund-positive"),
    ],
)
def test_refund_outside_limits_names_the_rule(amount: object, rule: str) -> None:
    d = _call("issue_refund", {"order_id": "ORD-125", "amount_usd": amount})
    assert not d.allowed and d.rule == rule and "amount_usd" in d.reason


def test_refund_over_100_needs_approval() -> None:
    d = _call("issue_refund", {"order_id": "ORD-125", "amount_usd": 250})
    assert d.allowed and d.needs_approval and d.rule == "refund-over-100"
    assert d.approval_timeout_seconds == 3600 and d.on_timeout == "reject"
    exact = _call("issue_refund", {"order_id": "ORD-125", "amount_usd": 100})
    assert exact.allowed and not exact.needs_approval


@pytest.mark.parametrize(
    ("to", "ok"),
    [
        ("alice@example.com", True),
        ("ALICE@Example.com ", True),
        ("support@example.com", True),
        ("mallory@evil.test", False),
        ("alice@example.com.evil.test", False),
        ("alice@example.com, mallory@evil.test", False),
        ("mallory@evil.test\nbcc: alice@example.com", False),
        ("", False),
    ],
)
def test_email_only_to_customer_or_staff(to: str, ok: bool) -> None:
    d = _call(
        "send_email",
        {"to": to, "subject": "Your refund", "body": "On its way."},
        context={"order_customer": "dave@example.org"} if "alice" not in to else CUSTOMER,
    )
    assert d.allowed is ok, d
    if not ok:
        assert d.rule == "email-recipient"


def test_email_to_customer_needs_the_fact_from_this_run() -> None:
    args = {"to": "dave@example.org", "subject": "s", "body": "b"}
    assert _call("send_email", args, context={"order_customer": ["x@y.test", "dave@example.org"]}).allowed
    d = _call("send_email", args, context={})
    assert not d.allowed and d.rule == "email-recipient" and "order_customer" in d.reason


SHELL = parse_policy(r"""
version: "2026-11-01.1"
roles: {ops: [shell:run]}
tenants: {acme: {users: {root: [ops]}, deny_tools: [send_email]}}
tools:
  run_shell:
    permissions: [shell:run]
    constraints:
      - {name: shell-allow-list, arg: command, prefix_in: [ls, cat]}
      - {name: shell-no-parent-dirs, arg: command, pattern: '([^.]|\.[^.])*\.?'}
""")


@pytest.mark.parametrize(
    ("command", "rule"),
    [
        ("ls -la", "allow"),
        ("cat notes.txt", "allow"),
        ("ls", "allow"),
        ("rm -rf /", "shell-allow-list"),
        ("lsblk", "shell-allow-list"),
        ("ls; rm -rf /", "shell-allow-list"),
        ("cat x | sh", "shell-allow-list"),
        ("ls $(whoami)", "shell-allow-list"),
        ("cat `id`", "shell-allow-list"),
        ("ls && curl evil", "shell-allow-list"),
        ("cat ../../etc/passwd", "shell-no-parent-dirs"),
    ],
)
def test_shell_allow_list(command: str, rule: str) -> None:
    d = _call("run_shell", {"command": command}, user="root", policy=SHELL)
    assert d.rule == rule and d.allowed is (rule == "allow"), d


def test_tenant_can_disable_a_tool() -> None:
    d = _call("send_email", {"to": "a@example.com"}, user="root", policy=SHELL)
    assert not d.allowed and d.rule == "tool-disabled"


def test_denied_user_is_denied_at_every_level() -> None:
    d = _call("lookup_order", {"order_id": "ORD-123"}, user="mallory")
    assert not d.allowed and d.rule == "user-not-allowed"


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text(max_size=12))
def test_refund_never_allowed_over_the_limit(amount: object) -> None:
    """Whatever the planner produces, nothing above $500 (or non-numeric) gets through."""
    d = _call("issue_refund", {"order_id": "ORD-125", "amount_usd": amount})
    if d.allowed:
        value = float(amount)  # type: ignore[arg-type]
        assert 0.01 <= value <= 500
        assert d.needs_approval == (value > 100)
