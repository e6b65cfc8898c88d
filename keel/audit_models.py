"""Payloads of the audit log, shared by the workflow (which builds entries) and the activity.

Pure models only: the workflow imports this module inside its sandbox, so it must not pull
in psycopg or do I/O. Hashing and storage live in ``activities/audit.py``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from keel.models import Frozen
from keel.text import scrub

__all__ = [
    "AUDIT_KINDS",
    "AuditEntry",
    "AuditKind",
    "AuditRow",
    "VerifyResult",
    "audit_key",
]

AuditKind = Literal["permission", "budget", "approval", "guardrail", "compensation", "tool", "run", "policy"]
AUDIT_KINDS: tuple[str, ...] = AuditKind.__args__  # type: ignore[attr-defined]


def audit_key(workflow_id: str, step_id: str, kind: str, subject: str, n: int = 0) -> str:
    """Idempotency key derived from the run's identity, never from the attempt.

    A retried activity (or a replayed workflow) rebuilds the same key, so the row is written
    once. ``n`` distinguishes deliberate repeats of the same decision (e.g. a re-plan).
    """
    return f"{workflow_id}/{step_id or '-'}/{kind}/{subject or '-'}/{n}"


class AuditEntry(Frozen):
    """One decision to record. ``reason`` and ``data`` are redacted before they are hashed."""

    tenant: str
    kind: AuditKind
    decision: str
    """Lower-case verdict: ``allow``, ``deny``, ``approve``, ``reject``, ``needs_approval``,
    ``ok``, ``error``, ``compensated``, ``flag``, ..."""
    idem_key: str = Field(min_length=1, max_length=400)
    user: str = ""
    workflow_id: str = ""
    step_id: str = ""
    subject: str = ""
    """What the decision is about: a tool name, a budget scope, a guardrail category."""
    reason: str = ""
    data: dict[str, Any] = Field(default_factory=dict)
    """Small structured detail (rule name, policy version, amounts); truncated above 4 KB."""

    @field_validator("decision")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower()

    @field_validator("reason", "data", "subject")
    @classmethod
    def _storable(cls, v: Any) -> Any:
        """A NUL from tool or model output must not make the audit write fail forever."""
        return scrub(v)


class AuditRow(AuditEntry):
    """A stored entry with its place in the tenant's chain."""

    id: int
    seq: int
    """Position in the tenant's chain, 1-based and gap-free."""
    ts: datetime
    """Database clock (``clock_timestamp()``) at append time."""
    prev_hash: str
    hash: str
    existing: bool = False
    """True when the append found this row already stored under the same ``idem_key``."""


class VerifyResult(Frozen):
    """Outcome of checking the hash chain(s); ``first_bad_id`` names the first broken row."""

    ok: bool
    checked: int = 0
    first_bad_id: int | None = None
    reason: str = ""
    tenant: str | None = None
    """Tenant whose chain is broken, when not ok."""
