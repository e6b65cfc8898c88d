"""The one redaction function: maintained detector patterns, typed placeholders, a fast path
that changes nothing, and identifiers that would leak into plaintext refused at the door."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import keel.redact as redact_mod
from keel.models import AgentRequest
from keel.redact import DETECTORS, PII_KINDS, SECRET_KINDS, find, redact, redact_data

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


_FRAGMENTS = st.sampled_from(
    [*SAMPLES.values(), "ORD-123", "refund", " ", "=", ":", "token", "Bearer ", "@", "-", "4", "x" * 20]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=12).map("".join), st.booleans())
def test_fast_path_never_changes_the_answer(text: str, pii: bool) -> None:
    """The one-pass pre-check only skips work: the result equals running every detector."""
    slow = text
    for det in DETECTORS if pii else [d for d in DETECTORS if not d.pii]:
        slow = det.pattern.sub(det.replace, slow)
    assert redact(text, pii=pii) == slow


@pytest.mark.parametrize("field", ["tenant", "user", "session", "workspace", "request_id"])
def test_identifiers_that_look_like_secrets_are_refused(field: str) -> None:
    base = {"tenant": "acme", "user": "alice", "message": "hi"}
    with pytest.raises(ValidationError, match="looks like a secret or personal data"):
        AgentRequest(**{**base, field: SAMPLES["aws_key"]})
    assert AgentRequest(**{**base, field: "plain-id.1"})
