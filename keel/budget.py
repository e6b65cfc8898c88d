"""Budget ledger payloads and scope naming, shared by the workflow and the activities.

Pure and I/O-free so the workflow can import it. The ledger itself lives in PostgreSQL
(its current schema in one file: ``keel/migrations/baseline/ledger.sql``);
``activities/ledger.py`` and its batcher ``activities/ledger_batch.py`` are the only code that
talks to it.

Scope names form a tree under the tenant, and a reservation charges every scope on its path
(the database adds missing ancestors itself, so naming only the run still charges the tenant)::

    acme                                        tenant
    acme/ws:default                             workspace
    acme/ws:default/user:bob                    user
    acme/ws:default/user:bob/run:<workflow_id>  run (workflow ids may contain '/')
    acme/tool:issue_refund                      per tool, under the tenant
    acme/model:openai:gpt-4o-mini               per model, under the tenant

Idempotency keys are derived from ``workflow_id/step_id`` (never from the attempt number):
a retried or replayed call returns the original answer, and the same key with a different
payload raises :class:`IdempotencyConflict`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, field_validator, model_validator

from keel.errors import KeelError
from keel.models import BudgetCaps, Decision, Frozen
from keel.money import usd_reason

__all__ = [
    "CommitRequest",
    "CommitResult",
    "ExtendRequest",
    "ExtendResult",
    "HistoryEntry",
    "IdempotencyConflict",
    "InvalidLedgerRequest",
    "LedgerError",
    "OpenRunRequest",
    "OpenRunResult",
    "ReleaseRequest",
    "ReleaseResult",
    "ReservationClosed",
    "ReservationNotFound",
    "ReserveRequest",
    "ReserveResult",
    "ScopeView",
    "AdmitRequest",
    "AdmitResult",
    "tool_hold",
    "model_scope",
    "parent_scope",
    "scope_path",
    "tool_scope",
]

_RUN_MARK = "/run:"


class LedgerError(KeelError):
    """Base of the ledger's refusals; none of them succeeds on retry (non-retryable)."""


class IdempotencyConflict(LedgerError):
    """The idempotency key was already used with a different payload (a caller bug)."""


class ReservationNotFound(LedgerError):
    """Commit, release or extend named a reservation that was never made."""


class ReservationClosed(LedgerError):
    """Commit after the reservation was released or denied: the release won the race."""


class InvalidLedgerRequest(LedgerError):
    """The ledger refused the request's values (a malformed scope, a negative amount)."""


def _segment(value: str, what: str) -> str:
    value = value.strip()
    if not value or "/" in value:
        raise ValueError(f"{what} must be non-empty and must not contain '/': {value!r}")
    return value


def scope_path(tenant: str, workspace: str, user: str, run_id: str) -> tuple[str, ...]:
    """The four scopes a run charges, tenant first, run last (``OpenRunRequest.scopes``)."""
    t = _segment(tenant, "tenant")
    ws = f"{t}/ws:{_segment(workspace, 'workspace')}"
    u = f"{ws}/user:{_segment(user, 'user')}"
    if not run_id.strip():
        raise ValueError("run_id must not be empty")
    return (t, ws, u, f"{u}{_RUN_MARK}{run_id.strip()}")


def tool_scope(tenant: str, tool: str) -> str:
    """Per-tool scope under the tenant, e.g. ``acme/tool:issue_refund``."""
    return f"{_segment(tenant, 'tenant')}/tool:{_segment(tool, 'tool')}"


def model_scope(tenant: str, model: str) -> str:
    """Per-model scope under the tenant, e.g. ``acme/model:openai:gpt-4o-mini``."""
    return f"{_segment(tenant, 'tenant')}/model:{_segment(model, 'model')}"


def parent_scope(scope: str) -> str | None:
    """Parent by the naming grammar; mirrors SQL ``keel_scope_parent`` (run ids may hold '/')."""
    if _RUN_MARK in scope:
        return scope.split(_RUN_MARK, 1)[0]
    if "/" in scope:
        return scope.rsplit("/", 1)[0]
    return None


class OpenRunRequest(Frozen):
    """Create a run's scopes; the last scope gets ``run_limit_micros`` (first call wins)."""

    scopes: tuple[str, ...]
    run_limit_micros: int | None = Field(default=None, ge=0)


class OpenRunResult(Frozen):
    scope: str
    limit_micros: int | None = None
    spent_micros: int = 0
    reserved_micros: int = 0


class ReserveRequest(Frozen):
    """Hold money on every scope of the path before a model or tool call."""

    key: str = Field(min_length=1)
    """``workflow_id/step_id`` (plus a suffix per call within the step), never the attempt."""
    scopes: tuple[str, ...] = Field(min_length=1)
    amount_micros: int = Field(ge=0)
    """Worst-case cost of the call (e.g. priced at ``max_tokens``)."""
    min_micros: int = Field(default=0, ge=0)
    """Smallest grant still useful; non-zero allows a partial ALLOW_WITH_CAPS grant."""
    max_tokens: int | None = Field(default=None, ge=1)
    """The call's output cap; caps scale it down when headroom is low."""
    ttl_seconds: int = Field(default=300, gt=0, le=86_400)
    """Lease: if neither committed nor released in time (worker died), the sweeper returns it."""
    kind: Literal["model", "tool"] = "model"
    subject: str = ""
    """The model (``openai:gpt-4o-mini``) or tool name, for history."""
    run_id: str = ""
    step_id: str = ""
    tier: str = ""

    @model_validator(mode="after")
    def _min_not_above_amount(self) -> ReserveRequest:
        if self.min_micros > self.amount_micros:
            raise ValueError("min_micros must not exceed amount_micros")
        return self


class ReserveResult(Frozen):
    """The ledger's decision. ``granted_micros`` is what is held (0 on DENY)."""

    decision: Decision
    key: str
    granted_micros: int = 0
    remaining_micros: int | None = None
    """Headroom left on the tightest enforced scope after this grant; ``None`` = unlimited."""
    caps: BudgetCaps = BudgetCaps()
    reason: str = ""
    observed: bool = False
    """An observe-mode scope would have decided more strictly; see ``would_decision``."""
    would_decision: Decision | None = None
    replayed: bool = False

    @field_validator("reason")
    @classmethod
    def _dollars(cls, v: str) -> str:
        # The ledger's SQL speaks micro-USD; every message that quotes it shows dollars.
        return usd_reason(v)


class CommitRequest(Frozen):
    """Record what the call really cost; op key ``<key>/commit``."""

    key: str = Field(min_length=1)
    actual_micros: int = Field(ge=0)
    scopes: tuple[str, ...] = ()
    """The hold's scopes (its ``ReserveRequest.scopes``). Holds are leases: if the database
    lost this one in a crash, the commit still records the spend on these scopes (as a late
    commit). Without them such a commit is refused (``KL002``). Not part of the idempotency
    payload."""
    kind: Literal["model", "tool"] = "model"


class CommitResult(Frozen):
    key: str
    committed_micros: int = 0
    refunded_micros: int = 0
    """Held but not spent, returned to every scope."""
    overrun_micros: int = 0
    """Spent beyond the hold (charged truthfully)."""
    debt_micros: int = 0
    """Largest part of the overrun booked into a scope's overdraft."""
    over_limit: bool = False
    """Some scope's overdraft could not absorb the overrun; recorded anyway, flagged."""
    late: bool = False
    """The lease had expired and been swept; the whole actual was charged as new spend."""
    lost_hold: bool = False
    """The hold itself was gone (a lease lost in a database crash, or a wrong key): the spend
    was recorded on the request's scopes as late spend. Worth an alert."""
    replayed: bool = False


class ReleaseRequest(Frozen):
    """Give a hold back (step skipped, cancelled); op key ``<key>/release``.

    ``reason`` is recorded but not part of the idempotency payload, so two cleanup paths
    releasing the same reservation with different wording do not conflict.
    """

    key: str = Field(min_length=1)
    reason: str = ""


class ReleaseResult(Frozen):
    key: str
    released_micros: int = 0
    status: str = ""
    """Status after the call: ``released``, or ``committed``/``expired`` when nothing was held,
    or ``missing`` (from the workflow's release activity only) when the hold was lost."""
    replayed: bool = False


class ExtendRequest(Frozen):
    """Push a hold's lease to at least ``now() + ttl_seconds``; op key ``<key>/extend:<seq>``."""

    key: str = Field(min_length=1)
    ttl_seconds: int = Field(gt=0, le=86_400)
    seq: int = Field(default=0, ge=0)
    """Distinguishes successive extensions of one hold (each is its own idempotent op)."""


class ExtendResult(Frozen):
    key: str
    status: str = ""
    expires_at: datetime | None = None
    extended: bool = False
    replayed: bool = False


class ScopeView(Frozen):
    """One scope as ``budget show`` prints it; ``children`` are one level deep."""

    scope: str
    parent: str | None = None
    limit_micros: int | None = None
    spent_micros: int = 0
    reserved_micros: int = 0
    debt_micros: int = 0
    overdraft_micros: int = 0
    over_limit_micros: int = 0
    observe: bool = False
    remaining_micros: int | None = None
    """``limit - spent - reserved`` of this scope alone; ``None`` = unlimited."""
    effective_remaining_micros: int | None = None
    """The smallest remaining over this scope and its ancestors: what a reservation can get."""
    children: tuple[ScopeView, ...] = ()


class HistoryEntry(Frozen):
    key: str
    status: str
    kind: str
    subject: str = ""
    run_id: str = ""
    step_id: str = ""
    decision: Decision
    would_decision: Decision | None = None
    requested_micros: int = 0
    amount_micros: int = 0
    actual_micros: int | None = None
    overrun_micros: int = 0
    over_limit: bool = False
    reason: str = ""
    created_at: datetime
    updated_at: datetime
    expires_at: datetime

    @field_validator("reason")
    @classmethod
    def _dollars(cls, v: str) -> str:
        return usd_reason(v)


def tool_hold(
    *, key: str, scopes: tuple[str, ...], amount_micros: int, tool: str, run_id: str, step_id: str, ttl: int
) -> ReserveRequest:
    """The one shape of a tool step's hold. The workflow places it when it admits a plan and
    the tool activity places it again before the effect: the same request under the same key
    is an idempotent replay in the ledger, never a second hold.

    The hold charges the tool's own scope (``<tenant>/tool:<name>``) besides the run's path,
    so ``budget set acme/tool:issue_refund 5`` binds every call of that tool."""
    per_tool = tool_scope(scopes[0].split("/", 1)[0], tool) if scopes else ""
    return ReserveRequest(
        key=key,
        scopes=scopes if not per_tool or per_tool in scopes else (*scopes, per_tool),
        amount_micros=amount_micros,
        min_micros=amount_micros,
        ttl_seconds=max(1, min(ttl, 86_400)),
        kind="tool",
        subject=tool,
        run_id=run_id,
        step_id=step_id,
    )


class AdmitRequest(Frozen):
    """Hold every step of a plan at once, all or none, before its first side effect."""

    holds: tuple[ReserveRequest, ...]


class AdmitResult(Frozen):
    admitted: bool
    amount_micros: int = 0
    """What the plan needs in all."""
    reason: str = ""
    """Why the plan was refused: the first hold the ledger denied."""

    @field_validator("reason")
    @classmethod
    def _dollars(cls, v: str) -> str:
        return usd_reason(v)
