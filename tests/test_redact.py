"""The one redaction function: maintained detector patterns, typed placeholders, a fast path
that changes nothing, and identifiers that would leak into plaintext refused at the door.

The fast path (``keel.redact.Gate``: a pattern is searched only if the text holds what every
match of it must hold) is attacked with a match of every pattern, including the spellings a
case-insensitive pattern matches and ``str.lower`` does not (a dotless i in ``api_key``, a
long s in ``secret``, the Kelvin sign), digits of other scripts and separated card numbers:
no gate may refuse a text its pattern matches, and the answer must equal searching every pattern."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import keel.redact as redact_mod
from keel.models import AgentRequest
from keel.redact import DETECTORS, PII_KINDS, SECRET_KINDS, _Digits, find, redact, redact_data

SAMPLES = {
    "openai_key": "sk-live-4eC39HqLyjWDarjtT1zdp7dcFAKE",
    "aws_key": "AKIAIOSFODNN7EXAMPLE",
    "stripe_key": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
    "slack_token": "xoxb-123456789012-1234567890123-abcdefghijklmnop",
    "gitlab_token": "glpat-abcdefghijklmnopqrst",
    "sendgrid_key": "SG." + "a" * 22 + "." + "b" * 43,
    "card": "4242424242424242",
    "email": "mallory@evil.test",
}


def test_public_surface() -> None:
    assert set(redact_mod.__all__) == {
        "DETECTORS",
        "Detector",
        "PII_KINDS",
        "SECRET_KINDS",
        "find",
        "redact",
        "redact_data",
    }
    assert {"openai_key", "aws_key", "stripe_key", "github_token", "private_key"} <= SECRET_KINDS
    assert PII_KINDS == {"email", "card", "ssn", "phone"}


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_each_kind_becomes_its_typed_placeholder(kind: str) -> None:
    text = f"before {SAMPLES[kind]} after"
    out = redact(text)
    assert SAMPLES[kind] not in out and f"[REDACTED:{kind}]" in out, out
    assert out.startswith("before ") and out.endswith(" after")
    assert kind in find(text)


def test_context_around_a_captured_secret_is_kept() -> None:
    # detect-secrets' basic-auth pattern captures the password; the URL around it stays.
    assert redact("postgres://keel:hunter2pass@db.internal/keel", pii=False) == (
        "postgres://keel:[REDACTED:basic_auth]@db.internal/keel"
    )
    assert redact("aws_secret_key = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'") == (
        "aws_secret_key = '[REDACTED:aws_key]'"
    )
    # a prefixed keyword (``aws_secret``, ``db_password``) keeps its label, loses its value
    assert redact("aws_secret = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'") == (
        "aws_secret = '[REDACTED:secret]'"
    )
    assert redact("db_password: hunter2hunter2") == "db_password: [REDACTED:secret]"
    assert redact("max_tokens: 1024000, input_tokens=1234567") == "max_tokens: 1024000, input_tokens=1234567"


def test_placeholders_are_not_redacted_again() -> None:
    once = redact("api_key=" + SAMPLES["openai_key"])
    assert redact(once) == once and redact_data({"k": once}) == {"k": once}


def test_ordinary_support_text_is_untouched() -> None:
    for text in (
        "Check if order ORD-123 is shipped and refund it if so",
        "lookup_order: order_id=ORD-483920193847, status=shipped, total_usd=42.5",
        "agent/acme/r-4f1c0a9e2b · $0.002249 · 2026-12-02T00:10:00Z",
        "postgresql://postgres@127.0.0.1:55432/keel",
    ):
        assert redact(text) == text and find(text) == []


MATCHES = [
    "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAK\n-----END RSA PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----\nMIIB unterminated",
    "eyJhbGciOiJI.eyJzdWIiOiIx.abcdefghij",
    "sk-ant-" + "a" * 20,
    "sk-" + "a" * 20 + "T3BlbkFJ" + "b" * 20,
    "ASIA" + "A" * 16,
    "A3TX" + "1" * 16,
    "ACCA" + "B" * 16,
    "aws_key = '" + "a" * 40 + "'",
    'AWS_SECRET_TOKEN="' + "A/+b" * 10 + '"',
    "AW\u017f pw '" + "x" * 40 + "'",
    "ghp_" + "a" * 36,
    "glpat-" + "a" * 20,
    "GR1348941" + "a" * 20,
    "glcbt-" + "ab_" + "a" * 20,
    "glimt-" + "a" * 25,
    "glptt-" + "a" * 40,
    "glagent-" + "a" * 50,
    "gloas-" + "a" * 64,
    "xoxb-123-abc",
    "XOXP-1-2-z9",
    "https://hooks.slack.com/services/T000/B000/XXXX",
    "HTTPS://HOOKS.SLACK.COM/SERVICES/T0/B0/x",
    "rk_live_" + "a" * 24,
    "AC" + "a" * 32,
    "SK" + "b" * 32,
    "a" * 32 + "-us12",
    "SG." + "a" * 22 + "." + "b" * 43,
    "//registry.npmjs.org/:_authToken=npm_abc",
    "//r.example/:_authToken= " + "0a-" * 12,
    "pypi-AgEIcHlwaS5vcmc" + "a" * 70,
    "pypi-AgENdGVzdC5weXBpLm9yZw" + "a" * 70,
    "sq0csp-" + "a" * 43,
    "M" + "a" * 23 + "." + "b" * 6 + "." + "c" * 27,
    "12345678:" + "a" * 35,
    "AccountKey=" + "a" * 88,
    "https://user:pass@host",
    "sk-proj-" + "a" * 20,
    "github_pat_" + "a" * 22,
    "ghs_" + "a" * 30,
    "xoxa-" + "a" * 10,
    "Bearer abcdefghijklmnop1234",
    "BEARER\tabcdefghijklmnop1234==",
    "password=hunter2hunter2",
    "DB_PASSWD: 'abcdefgh'",
    "ap\u0131_key=abcdefgh",
    "\u017fecret=abcdefgh",
    "access_to\u212aen: abcdefgh",
    '"api-key": "abcdefghij"',
    "a.b@c.co",
    "4242 4242 4242 4242",
    "4242-4242-4242-4242",
    "4 2 4 2 4 2 4 2 4 2 4 2 4 2 4 2",
    "123-45-6789",
    "\u0661\u0662\u0663-\u0664\u0665-\u0666\u0667\u0668\u0669",
    "+1 (555) 123-4567",
    "555.123.4567",
    "\u0665\u0665\u0665 \u0661\u0662\u0663 \u0664\u0665\u0666\u0667",
]
"""A match of every detector (each is asserted below to be matched by some pattern)."""


def test_every_detector_has_a_gate() -> None:
    # an upstream pattern that changed finds no gate: correct, but searched every time
    assert [d.pattern.pattern for d in DETECTORS if d.gate is None] == []


def test_every_detector_is_matched_by_the_corpus() -> None:
    unmatched = [d.pattern.pattern for d in DETECTORS if not any(d.pattern.search(m) for m in MATCHES)]
    assert unmatched == []


@pytest.mark.parametrize("text", MATCHES)
def test_no_gate_refuses_a_text_its_pattern_matches(text: str) -> None:
    for context in ("{}", "x {} y", "password: {}.", "1-2 {} 3"):
        t = context.format(text)
        for det in DETECTORS:
            if det.pattern.search(t):
                assert det.may_match(t, _Digits(t)), (det.kind, det.pattern.pattern, t)
        assert redact(t) != t or not find(t)


_FRAGMENTS = st.sampled_from(
    [
        *SAMPLES.values(),
        *MATCHES,
        "ORD-123",
        "refund",
        " ",
        "=",
        ":",
        "'",
        '"',
        "token",
        "Bearer ",
        "@",
        "-",
        ".",
        "://",
        "4",
        "\u0663",
        "\u017f",
        "\u0131",
        "\u212a",
        "x" * 20,
        "[REDACTED:secret]",
    ]
)


@settings(max_examples=600, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=12).map("".join), st.booleans())
def test_fast_path_never_changes_the_answer(text: str, pii: bool) -> None:
    """The gates only skip work: the result equals running every detector, and so do the
    kinds ``find`` reports."""
    slow, kinds = text, []
    for det in DETECTORS if pii else [d for d in DETECTORS if not d.pii]:
        if det.kind not in kinds and any(det.replace(m) != m.group(0) for m in det.pattern.finditer(text)):
            kinds.append(det.kind)
        slow = det.pattern.sub(det.replace, slow)
    assert redact(text, pii=pii) == slow
    assert find(text, pii=pii) == kinds


@pytest.mark.parametrize("field", ["tenant", "user", "session", "workspace", "request_id"])
def test_identifiers_that_look_like_secrets_are_refused(field: str) -> None:
    base = {"tenant": "acme", "user": "alice", "message": "hi"}
    with pytest.raises(ValidationError, match="looks like a secret or personal data"):
        AgentRequest(**{**base, field: SAMPLES["aws_key"]})
    assert AgentRequest(**{**base, field: "plain-id.1"})
