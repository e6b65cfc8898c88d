"""The policy file: the shipped one loads, every kind of mistake is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

import keel.policy as policy_mod
from keel.policy import Policy, PolicyError, load_policy, parse_policy

SHIPPED = Path(__file__).parent.parent / "config" / "policy.yaml"

VALID = """
version: "2026-11-01.7"
roles:
  ops: [shell:run, "orders:*"]
tenants:
  t1:
    users: [carol, dave]
    roles: [ops]
    deny_tools: [send_email]
  t2:
    users: {erin: ops, frank: null}
    roles: [ops]
tools:
  run_shell:
    constraints:
      - {name: shell-allow-list, arg: command, prefix_in: [ls, cat]}
      - {name: no-dots, arg: command, pattern: "[^.]*", optional: true}
    approvals:
      - {name: always-ask, timeout_seconds: 60}
limits: {max_iterations: 5}
guardrails: {input: {block: [injection]}}
"""


def test_exports() -> None:
    assert "parse_policy" in policy_mod.__all__ and "PolicyError" in policy_mod.__all__
    assert all(hasattr(policy_mod, n) for n in policy_mod.__all__)


def test_shipped_policy_loads() -> None:
    p = load_policy(SHIPPED)
    assert p.version == "2026-12-02.1"
    assert p.tenants["acme"].users == {"alice": ("support",), "bob": ("viewer",), "carol": ("operations",)}
    assert p.tenants["globex"].any_user and p.tenants["globex"].roles == ("viewer",)
    assert "refunds:write" in p.roles["support"] and "refunds:write" not in p.roles["viewer"]
    limit = next(c for c in p.tools["issue_refund"].constraints if c.name == "refund-hard-limit")
    assert limit.max == 500
    assert p.tools["issue_refund"].approvals[0].when.gt == 100
    assert p.tools["issue_refund"].approvals[0].on_timeout == "reject"
    assert p.limits.max_tool_calls == 12 and p.limits.min_confidence == 0.5


def test_valid_policy_normalises_user_spellings() -> None:
    p = parse_policy(VALID, "v.yaml")
    assert p.tenants["t1"].users == {"carol": ("ops",), "dave": ("ops",)}
    assert p.tenants["t2"].users == {"erin": ("ops",), "frank": ("ops",)}
    assert p.limits.max_iterations == 5 and p.limits.deadline_seconds == 300
    assert p.tools["run_shell"].approvals[0].on_timeout == "reject"


def test_snapshot_round_trips_through_json() -> None:
    """The workflow receives the policy through history: dump → load must be identical."""
    for p in (load_policy(SHIPPED), parse_policy(VALID)):
        assert Policy.model_validate_json(p.model_dump_json()) == p
        assert len(p.model_dump_json()) < 8000


def test_defaults_when_sections_are_absent() -> None:
    p = parse_policy('version: "2026-01-01.1"')
    assert p.tenants == {} and p.limits.thrash_repeats == 3 and p.guardrails.input.enabled


BAD = [
    ("version: 2026", "x.yaml: version: must be a quoted string"),
    ("roles: {}", "x.yaml: version: Field required"),
    (
        'version: "2026-11-01.1"\ntenants: {a: {users: [x], roles: [nope]}}',
        "x.yaml: tenants.a.roles: unknown role 'nope'",
    ),
    (
        'version: "2026-11-01.1"\nroles: {r: [a]}\ntenants: {a: {users: {x: [r, ghost]}}}',
        "x.yaml: tenants.a.users.x: unknown role 'ghost' (defined: r)",
    ),
    (
        'version: "2026-11-01.1"\nroles: {r: [a]}\ntenants: {a: {users: "*"}}',
        'x.yaml: tenants.a.roles: users: "*" needs roles',
    ),
    (
        'version: "2026-11-01.1"\ntools: {t: {constraints: [{name: c, arg: a, mx: 5}]}}',
        "x.yaml: tools.t.constraints[0]: unknown field 'mx'",
    ),
    (
        'version: "2026-11-01.1"\ntools: {t: {constraints: [{name: c, arg: a, max: lots}]}}',
        "x.yaml: tools.t.constraints[0].max: Input should be a valid number",
    ),
    (
        'version: "2026-11-01.1"\ntools: {t: {constraints: [{arg: a, max: 5}]}}',
        "x.yaml: tools.t.constraints[0].name: Field required",
    ),
    (
        'version: "2026-11-01.1"\ntools: {t: {constraints: [{name: c, arg: a, pattern: "(["}]}}',
        "x.yaml: tools.t.constraints[0].pattern: pattern refused by the linear-time engine (RE2)",
    ),
    (
        'version: "2026-11-01.1"\ntools: {t: {constraints: [{name: c, arg: a, max: 1}, '
        "{name: c, arg: b, max: 2}]}}",
        "x.yaml: tools.t: rule name 'c' used twice",
    ),
    (
        'version: "2026-11-01.1"\ntools: {t: {approvals: [{name: a, on_timeout: maybe}]}}',
        "x.yaml: tools.t.approvals[0].on_timeout: Input should be 'reject' or 'approve'",
    ),
    (
        'version: "2026-11-01.1"\ntools: {t: {approvals: [{name: a, when: {gt: 3}}]}}',
        "x.yaml: tools.t.approvals[0].when: a comparison needs 'arg'",
    ),
    (
        'version: "2026-11-01.1"\nlimits: {max_iterations: 0}',
        "x.yaml: limits.max_iterations: Input should be greater than or equal to 1",
    ),
    (
        'version: "2026-11-01.1"\nguardrails: {input: {block: [spam]}}',
        "x.yaml: guardrails.input.block: unknown category 'spam'",
    ),
    ('version: "2026-11-01.1"\nroles: {r: ["Bad Perm"]}', "x.yaml: roles.r[0]: invalid permission"),
    ("version: [unclosed", "x.yaml: line 1, column"),
    ("- just\n- a list", "x.yaml: (top level): expected a mapping"),
    (
        'version: "2026-11-01.1"\nextra_section: 1',
        "x.yaml: (top level): unknown field 'extra_section'",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[b[1][8:40] for b in BAD])
def test_bad_policy_is_one_clear_line(text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "x.yaml")
    msg = str(err.value)
    assert msg.startswith(expected), msg
    assert "\n" not in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"nope\.yaml: cannot read policy file"):
        load_policy(tmp_path / "nope.yaml")


def test_history_decoding_is_lenient() -> None:
    """Outside file parsing, unknown keys from a newer worker's snapshot are ignored."""
    data = load_policy(SHIPPED).model_dump(mode="json")
    data["future_field"] = {"x": 1}
    assert Policy.model_validate(data).version == "2026-12-02.1"


# --- failing closed (issue 17) -------------------------------------------------------------

from keel.activities.tools.loader import catalog  # noqa: E402  (the real registry, hidden tools too)

CATALOGUE = catalog(include_hidden=True)
SHIPPED_TEXT = SHIPPED.read_text()


def test_shipped_policy_loads_against_the_tool_registry() -> None:
    assert load_policy(SHIPPED, CATALOGUE).version


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("  issue_refund:\n", "  isue_refund:\n"), "tools.isue_refund: unknown tool 'isue_refund' (known: "),
        (("arg: amount_usd\n        min", "arg: amount\n        min"), "tool 'issue_refund' has no argument"),
        (("when: {arg: amount_usd, gt: 100}", "when: {arg: amont_usd, gt: 100}"), "approvals[0].when.arg"),
        (("max: 500\n", "max: 1e400\n"), "max: Input should be a finite number"),
        (("max: 500\n", "max: .inf\n"), "max: Input should be a finite number"),
        (("min: 0.01\n", "min: .nan\n"), "min: Input should be a finite number"),
        (("    users:\n      alice", "    users:\n      bob: [viewer]\n      alice"), "duplicate key 'bob'"),
        (
            ("\n\n# Plan-then", "\n  send_email:\n    permissions: [x:y]\n\n# Plan-then"),
            "duplicate key 'send_email'",
        ),
        (("bob: [viewer]", "bob: [viewr]"), "tenants.acme.users.bob: unknown role 'viewr'"),
        (("max_length: 200", r"pattern: '(\w)\1'"), "refused by the linear-time engine"),
        (("max_length: 200", "pattern: '(?=a)a'"), "refused by the linear-time engine"),
        (
            # A daily cap on e-mails would only ever count one run's: refused, not weakened.
            (
                "  send_email:\n    constraints:\n",
                "  send_email:\n    cumulative:\n      - {name: mails-"
                "per-day, arg: to, per: tenant_day, max: 50}\n    constraints:\n",
            ),
            "tools.send_email.cumulative[0].per: per: tenant_day needs the tool's calls across runs",
        ),
    ],
)
def test_a_typo_in_the_shipped_policy_is_refused(edit: tuple[str, str], expected: str) -> None:
    """The issue's fail-open cases, each applied to the real policy: none may load."""
    assert edit[0] in SHIPPED_TEXT
    with pytest.raises(PolicyError) as err:
        parse_policy(SHIPPED_TEXT.replace(edit[0], edit[1], 1), "policy.yaml", CATALOGUE)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_unknown_tool_in_deny_tools_is_refused() -> None:
    text = SHIPPED_TEXT.replace("    roles: [viewer]", "    roles: [viewer]\n    deny_tools: [sendmail]", 1)
    with pytest.raises(PolicyError, match=r"deny_tools\[0\]: unknown tool 'sendmail'"):
        parse_policy(text, "p.yaml", CATALOGUE)


def test_catastrophic_pattern_runs_in_linear_time() -> None:
    """``(a+)+$`` takes Python's re ~0.7 s at 25 characters and 4x per 2 more; RE2 is linear."""
    import time

    from keel.gate import _pattern

    policy = parse_policy(
        'version: "2026-11-01.1"\ntools: {noop: {constraints: [{name: evil, arg: note, pattern: "(a+)+$"}]}}',
        "p.yaml",
        CATALOGUE,
    )
    pat = policy.tools["noop"].constraints[0].pattern
    assert pat is not None
    t0 = time.perf_counter()
    for n in (25, 1000, 100_000):
        assert _pattern(pat).fullmatch("a" * n + "!") is None
    assert time.perf_counter() - t0 < 0.5


def test_policy_hash_identifies_the_exact_text() -> None:
    from keel.policy import policy_hash

    assert policy_hash(SHIPPED_TEXT) == policy_hash(SHIPPED_TEXT)
    assert policy_hash(SHIPPED_TEXT) != policy_hash(SHIPPED_TEXT + "\n# edited\n")
