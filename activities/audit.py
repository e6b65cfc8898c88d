"""The tamper-evident audit log: append, read a run's trail, verify the hash chains.

Hash chain, per tenant: row ``n`` stores ``prev_hash`` (row ``n-1``'s hash, ``""`` for the
first row) and a hash over ``prev_hash`` and the row's content. Version 2 (every append
since migration 007) is computed by the database in ``keel_audit_append``: sha256 over the
length-prefixed fields (see ``row_hash_v2``); version 1 rows, hashed by the application as
``sha256(prev_hash + "\\n" + compact key-sorted JSON)`` (``row_hash``), still verify. Editing a row breaks
its hash; deleting or reordering rows breaks ``seq`` (1-based, gap-free) or the
``prev_hash`` link; deleting the newest rows is caught against ``audit_heads``. Someone
who can rewrite every row AND the head could forge a consistent chain: anchor head hashes
elsewhere (export them) when that matters.

Why per tenant: an append locks its tenant's head row (``select ... for update``) for the
few milliseconds of its transaction; one global chain would make every tenant's decisions
queue behind each other. ``ts`` is the database clock read under that lock, so within a
tenant ts never goes backwards relative to seq.

Idempotency: ``idem_key`` is unique; appending a key already stored returns the stored row
(first write wins), so an activity retry never duplicates a row. ``reason`` and ``data``
pass through ``redact_data`` BEFORE hashing, so no secret is ever stored or hashed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from keel.activities.guardrails import redact, redact_data
from keel.audit_models import AuditEntry, AuditRow, VerifyResult
from keel.budget import ReserveResult
from keel.errors import KeelError

__all__ = [
    "AuditError",
    "Checkpoint",
    "append",
    "checkpoint",
    "append_many",
    "append_statement",
    "budget_change_entry",
    "observed_entry",
    "row_hash",
    "row_hash_v2",
    "trail",
    "verify",
    "verify_checkpoint",
]

_MAX_DATA_CHARS = 4096  # rows stay small: detail lives in tool_effects / memory, not here
_MAX_REASON_CHARS = 2000
_COLS = (
    'id, tenant, seq, ts, "user", workflow_id, step_id, kind, subject, decision, reason, '
    "data, idem_key, prev_hash, hash"
)


class AuditError(KeelError, RuntimeError):
    """The audit log refused an append (e.g. an idem_key already used by another tenant)."""


def _jsonable(v: Any) -> Any:
    """Make ``v`` survive a jsonb round trip unchanged, so the stored row re-hashes identically."""
    if isinstance(v, str):
        return v.replace("\x00", "")  # PostgreSQL text cannot hold NUL
    if v is None or isinstance(v, bool | int):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return int(v) if v.is_integer() and abs(v) >= 1e15 else v  # jsonb prints 1e20 as digits
    if isinstance(v, dict):
        return {_jsonable(str(k)): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return _jsonable(str(v))


def _prepare(e: AuditEntry) -> AuditEntry:
    data = _jsonable(redact_data(dict(e.data)))
    text = json.dumps(data, sort_keys=True, ensure_ascii=False)
    if len(text) > _MAX_DATA_CHARS:
        data = {"truncated": True, "preview": text[:1000]}
    reason = _jsonable(redact(e.reason))[:_MAX_REASON_CHARS]
    return e.model_copy(update={"reason": reason, "data": data, "subject": _jsonable(e.subject)})


def row_hash(prev_hash: str, tenant: str, seq: int, ts: datetime, e: AuditEntry) -> str:
    """The chain hash of one row (see module docstring for the exact definition)."""
    content = {
        "tenant": tenant,
        "seq": seq,
        "ts": ts.astimezone(UTC).isoformat(timespec="microseconds"),
        "user": e.user,
        "workflow_id": e.workflow_id,
        "step_id": e.step_id,
        "kind": e.kind,
        "subject": e.subject,
        "decision": e.decision,
        "reason": e.reason,
        "data": e.data,
        "idem_key": e.idem_key,
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{prev_hash}\n{canonical}".encode()).hexdigest()


def _row(r: Sequence[Any], existing: bool = False) -> AuditRow:
    names = (
        "id",
        "tenant",
        "seq",
        "ts",
        "user",
        "workflow_id",
        "step_id",
        "kind",
        "subject",
        "decision",
        "reason",
        "data",
        "idem_key",
        "prev_hash",
        "hash",
    )
    return AuditRow(**dict(zip(names, r, strict=True)), existing=existing)


def observed_entry(
    res: ReserveResult,
    *,
    tenant: str,
    key: str,
    subject: str,
    requested_micros: int,
    user: str = "",
    workflow_id: str = "",
    step_id: str = "",
) -> AuditEntry | None:
    """The audit row of an observe-mode scope's would-be decision (issue 17), or None.

    An observed scope records what it would have decided without enforcing it; the ledger
    keeps that in its reservation row, and this makes it one audit row in the tenant's chain
    (``would_deny`` or ``would_cap``) so ``audit show`` tells what enforcing would change."""
    if not res.observed:
        return None
    would = (res.would_decision or res.decision).value
    return AuditEntry(
        tenant=tenant,
        user=user,
        workflow_id=workflow_id,
        step_id=step_id,
        kind="budget",
        subject=subject,
        decision="would_deny" if would == "DENY" else "would_cap",
        reason=(res.reason or f"an observe-mode scope would decide {would}")[:500],
        data={
            "rule": "observe-mode",
            "enforced": res.decision.value,
            "would": would,
            "requested_micros": requested_micros,
            "granted_micros": res.granted_micros,
        },
        idem_key=f"{key}/observe",
    )


def budget_change_entry(
    *,
    tenant: str,
    key: str,
    subject: str,
    decision: str,
    reason: str,
    data: dict[str, Any],
    user: str = "",
    workflow_id: str = "",
    step_id: str = "",
) -> AuditEntry:
    """The audit row of a budget decision that changed the run (issue 17): caps applied (a
    cheaper tier, fewer output tokens than asked, less budget than asked) or an optional step
    skipped. ``data["rule"]`` names what decided (``budget-caps``)."""
    return AuditEntry(
        tenant=tenant,
        user=user,
        workflow_id=workflow_id,
        step_id=step_id,
        kind="budget",
        subject=subject,
        decision=decision,
        reason=reason[:500],
        data={"rule": "budget-caps", **data},
        idem_key=f"{key}/{decision}",
    )


async def append_many(conn: AsyncConnection[Any], entries: Sequence[AuditEntry]) -> list[AuditRow]:
    """Append entries in order; returns one row per entry (existing ones marked).

    Each entry is ONE call of ``keel_audit_append`` (migration 007): the database locks the
    tenant's head, reads its clock, hashes the row and inserts it, so an append costs one
    round trip and no client-side work beyond redaction. Inside a caller's transaction the
    rows commit or roll back with it (the head stays locked until then: keep it short).
    Idempotent by ``idem_key``: a key already stored for this tenant returns the stored row;
    a key stored for another tenant is refused.
    """
    rows: list[AuditRow] = []
    for e in (_prepare(e) for e in entries):
        try:
            cur = await conn.execute(*append_statement(e, prepared=True), prepare=True)
        except psycopg.errors.UniqueViolation as exc:
            raise AuditError(f"idem_key {e.idem_key!r} already used by another tenant") from exc
        rid, seq, ts, prev, h, existing = await cur.fetchone()  # type: ignore[misc]
        if existing:  # first write wins: return what is stored, not this retry's text
            stored = await (
                await conn.execute(f"select {_COLS} from audit_log where id = %s", (rid,))
            ).fetchone()
            rows.append(_row(stored, existing=True))  # type: ignore[arg-type]
            continue
        rows.append(
            AuditRow(**e.model_dump(), id=rid, seq=seq, ts=ts, prev_hash=prev, hash=h, existing=False)
        )
    return rows


_APPEND_SQL = "select * from keel_audit_append(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"


def append_statement(entry: AuditEntry, *, prepared: bool = False) -> tuple[str, tuple[Any, ...]]:
    """The SQL of one append (redacted first), for callers that batch it with other
    statements in one pipelined round trip; ``append_many`` is the plain interface."""
    e = entry if prepared else _prepare(entry)
    return _APPEND_SQL, (
        e.tenant,
        e.user,
        e.workflow_id,
        e.step_id,
        e.kind,
        e.subject,
        e.decision,
        e.reason,
        Jsonb(e.data),
        e.idem_key,
    )


def row_hash_v2(prev_hash: str, r: AuditRow, data_text: str) -> str:
    """Hash version 2 (computed by the database on append; see migration 007)."""
    ts = r.ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fields = (
        prev_hash,
        r.tenant,
        str(r.seq),
        ts,
        r.user,
        r.workflow_id,
        r.step_id,
        r.kind,
        r.subject,
        r.decision,
        r.reason,
        data_text,
        r.idem_key,
    )
    return hashlib.sha256("".join(f"{len(f)}:{f};" for f in fields).encode()).hexdigest()


async def append(conn: AsyncConnection[Any], entry: AuditEntry) -> AuditRow:
    """Append one entry (idempotent by ``idem_key``); see ``append_many``."""
    return (await append_many(conn, [entry]))[0]


async def trail(conn: AsyncConnection[Any], workflow_id: str) -> list[AuditRow]:
    """Every row recorded for one run, oldest first."""
    cur = await conn.execute(
        f"select {_COLS} from audit_log where workflow_id = %s order by id", (workflow_id,)
    )
    return [_row(r) for r in await cur.fetchall()]


def _bad(checked: int, row_id: int | None, tenant: str, reason: str) -> VerifyResult:
    return VerifyResult(
        ok=False,
        checked=checked,
        first_bad_id=row_id,
        tenant=tenant,
        reason=f"tenant {tenant}: {reason}",
    )


async def verify(conn: AsyncConnection[Any], tenant: str | None = None) -> VerifyResult:
    """Recompute every chain (or one tenant's) from one snapshot; stops at the first break.

    Opens its own REPEATABLE READ transaction, so pass a connection that is not already in
    one. Rows are streamed, so memory stays flat however long the log is.
    """
    where, params = ("where tenant = %s", (tenant,)) if tenant is not None else ("", ())
    checked = 0
    async with conn.transaction():
        await conn.execute("set transaction isolation level repeatable read, read only")
        hcur = await conn.execute(f"select tenant, seq, hash from audit_heads {where}", params)
        heads = {t: (s, h) for t, s, h in await hcur.fetchall()}
        seen: dict[str, tuple[int, str, int]] = {}  # tenant -> (last seq, last hash, last id)
        cur = conn.cursor()
        async for raw in cur.stream(
            f"select {_COLS}, hash_version, data::text from audit_log {where} order by tenant, id", params
        ):
            r = _row(raw[:-2])
            version, data_text = raw[-2], raw[-1]
            last_seq, prev, _ = seen.get(r.tenant, (0, "", 0))
            checked += 1
            if r.seq != last_seq + 1:
                why = "rows removed or reordered" if r.seq > last_seq else "rows reordered"
                return _bad(
                    checked,
                    r.id,
                    r.tenant,
                    f"row {r.id} has seq {r.seq} where {last_seq + 1} was expected ({why})",
                )
            if r.prev_hash != prev:
                return _bad(
                    checked,
                    r.id,
                    r.tenant,
                    f"row {r.id} does not link to the previous row (rows reordered, removed or rewritten)",
                )
            expected = (
                row_hash_v2(prev, r, data_text) if version == 2 else row_hash(prev, r.tenant, r.seq, r.ts, r)
            )
            if expected != r.hash:
                return _bad(
                    checked,
                    r.id,
                    r.tenant,
                    f"row {r.id} was modified (content does not match its hash)",
                )
            seen[r.tenant] = (r.seq, r.hash, r.id)
    for t, (seq, h) in sorted(heads.items()):
        last_seq, last_hash, last_id = seen.get(t, (0, "", 0))
        if (seq, h) != (last_seq, last_hash):
            return _bad(
                checked,
                last_id or None,
                t,
                f"chain head is at seq {seq} but the last row "
                f"is seq {last_seq} (newest rows removed or head altered)",
            )
    missing = sorted(set(seen) - set(heads))
    if missing:
        return _bad(checked, seen[missing[0]][2], missing[0], "rows exist but the chain head is gone")
    return VerifyResult(ok=True, checked=checked, tenant=tenant)


class Checkpoint(dict):  # type: ignore[type-arg]
    """One signed chain head: ``{"tenant", "seq", "hash", "at", "mac"}`` (a JSON line)."""


def _mac(key: bytes, tenant: str, seq: int, head: str, at: str) -> str:
    msg = json.dumps([tenant, seq, head, at], separators=(",", ":")).encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


async def checkpoint(conn: AsyncConnection[Any], key: bytes) -> list[Checkpoint]:
    """Every tenant's chain head, signed with HMAC-SHA256 under ``key``.

    Written somewhere the database's users cannot rewrite (an append-only file, object
    storage with retention, a ticket), these anchor the chain: someone who deletes the newest
    rows and rewrites ``audit_heads`` to match still cannot produce the checkpointed row.
    """
    if not key:
        raise AuditError("no HMAC key: set KEEL_AUDIT_HMAC_KEY")
    rows = await (
        await conn.execute("select tenant, seq, hash, now() from audit_heads order by tenant")
    ).fetchall()
    out = []
    for tenant, seq, head, now in rows:
        at = now.astimezone(UTC).isoformat(timespec="seconds")
        out.append(Checkpoint(tenant=tenant, seq=seq, hash=head, at=at, mac=_mac(key, tenant, seq, head, at)))
    return out


async def verify_checkpoint(
    conn: AsyncConnection[Any], checkpoints: Sequence[dict[str, Any]], key: bytes
) -> VerifyResult:
    """Check the chains against the LAST checkpoint of each tenant: its signature must hold,
    the row it names must still be there with the same hash, and the head must not be behind
    it. ``verify`` (the chain itself) should pass too; this adds what it cannot see."""
    latest: dict[str, dict[str, Any]] = {}
    for c in checkpoints:
        latest[str(c.get("tenant"))] = c
    checked = 0
    for tenant, c in sorted(latest.items()):
        checked += 1
        try:
            seq, head, at, mac = int(c["seq"]), str(c["hash"]), str(c["at"]), str(c["mac"])
        except (KeyError, TypeError, ValueError):
            return _bad(checked, None, tenant, "checkpoint line is malformed")
        if not hmac.compare_digest(mac, _mac(key, tenant, seq, head, at)):
            return _bad(
                checked, None, tenant, f"checkpoint of {at} has a bad signature (forged or wrong key)"
            )
        if seq == 0:
            continue
        row = await (
            await conn.execute("select id, hash from audit_log where tenant=%s and seq=%s", (tenant, seq))
        ).fetchone()
        if row is None:
            return _bad(
                checked,
                None,
                tenant,
                f"row seq {seq} signed at {at} is gone (newest rows removed, head rewritten)",
            )
        if row[1] != head:
            return _bad(checked, row[0], tenant, f"row seq {seq} no longer has the hash signed at {at}")
        now = await (await conn.execute("select seq from audit_heads where tenant=%s", (tenant,))).fetchone()
        if now is None or now[0] < seq:
            return _bad(checked, row[0], tenant, f"chain head is behind the checkpoint of {at} (seq {seq})")
    return VerifyResult(ok=True, checked=checked)
