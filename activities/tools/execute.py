"""The one activity that runs a tool: validate, execute once per key, record, settle budget.

Exactly-once is built from one PostgreSQL transaction per call: the tool's own writes, a
``tool_effects`` row under the idempotency key (``workflow_id/step_id``), and the ledger
commit of the step's reservation. A retry, a replay or a second worker racing on the same
key finds the recorded effect and returns it with ``replayed=True``; nothing happens twice.
Failure classification lives here and only here: ``ToolError(retryable=...)`` and argument
validation map to Temporal's retryable / non-retryable application errors, and only
transient failures count against the tool's circuit breaker (``tool:<name>``, shared by
all workers in PostgreSQL). An open breaker fails the call at once with the non-retryable
``CircuitOpen``, so the workflow takes the tool's declared fallback or fails the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel import telemetry
from keel.activities import audit, breaker, ledger
from keel.activities.guardrails import redact, redact_data
from keel.activities.heartbeat import heartbeating
from keel.activities.tools import effects
from keel.activities.tools.loader import catalog
from keel.activities.tools.mcp import mcp_spec
from keel.activities.tools.registry import REGISTRY, LimitExceeded, ToolContext, ToolError
from keel.agents import McpServer
from keel.audit_models import AuditEntry
from keel.budget import CommitRequest, ReleaseRequest, tool_hold
from keel.codec import KeyRing
from keel.errors import (
    INVALID_TOOL_ARGUMENTS,
    STEP_ABANDONED,
    TOOL_ENDED_TRANSACTION,
    TOOL_PERMANENT_ERROR,
    TOOL_TRANSIENT_ERROR,
    UNKNOWN_TOOL,
)
from keel.models import Decision, ToolCall, ToolResult, first_error
from keel.telemetry import annotate

__all__ = ["ToolActivities", "summarize_result"]

log = logging.getLogger(__name__)


def summarize_result(tool: str, data: dict[str, Any]) -> str:
    """A one-line, human-readable summary for the status view and the Web UI (redacted:
    it is shown wherever steps are, so tool output's secrets and PII stay out of it)."""
    parts = [f"{k}={v}" for k, v in data.items() if not isinstance(v, dict | list)][:5]
    return redact(f"{tool}: " + ", ".join(parts))


class ToolActivities:
    """Holds the connection pool and the payload keys; ``run_tool`` is registered with the worker.

    ``tool_effects.result`` at rest is the redacted result (readable with SQL, safe to
    export) plus the full result sealed under the payload keys (``keel.codec.seal``), which
    is what a replay returns. Without keys (tool harnesses) only the redacted copy is kept.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        keys: KeyRing | None = None,
        mcp_servers: Callable[[], Mapping[str, McpServer]] = dict,
    ) -> None:
        """``mcp_servers`` names the MCP servers of this worker's agent definitions (the
        worker passes them; without it, as in tool harnesses, no MCP tool runs)."""
        self._pool = pool
        self._keys = keys
        self._mcp_servers = mcp_servers
        catalog()  # import the built-in tools once, at worker start

    @activity.defn(name="run_tool")
    async def run_tool(self, call: ToolCall) -> ToolResult:
        annotate(tenant=call.tenant, user=call.user, tool=call.tool, step=call.step_id)
        # Every stage beats, waiting for a pooled connection and for the key's lock included:
        # an attempt the server has given up on learns it at its next beat and is cancelled.
        return await _with_heartbeats(self._run(call))

    async def _run(self, call: ToolCall) -> ToolResult:
        spec = REGISTRY.get(call.tool) or mcp_spec(call.tool, self._mcp_servers())  # MCP: <server>.<tool>
        if spec is None:
            raise ApplicationError(f"unknown tool {call.tool!r}", type=UNKNOWN_TOOL, non_retryable=True)
        try:
            args = spec.args_model.model_validate(call.args)
        except ValidationError as e:
            telemetry.record_tool_call(
                call.tool, "error", tenant=call.tenant, error_type=INVALID_TOOL_ARGUMENTS
            )
            # ``from None``: the workflow reports a failure's innermost message, and the
            # validation error's own first line ("1 validation error for X") names no field.
            raise ApplicationError(
                f"{call.tool}: invalid arguments: {first_error(e, 'arguments')}",
                type=INVALID_TOOL_ARGUMENTS,
                non_retryable=True,
            ) from None
        scope = f"tool:{call.tool}"
        async with self._pool.connection() as conn:
            try:
                opened = await _open_step(conn, call, spec.info.optional, scope, self._keys)
            except BaseException:
                await _abandon(conn)
                raise
            if opened.found is not None:  # a replay is not a call: the breaker never sees it
                return _replayed(call, opened.found)
            if opened.refused is not None:
                return opened.refused
            guard = _Guard(conn, scope, probe_lease_seconds=spec.info.timeout_seconds + 5)
            if opened.permit is None:
                # A breaker that is not closed: its probe claim and its verdict must commit
                # even when the tool's own writes roll back, so it is acquired on its own,
                # outside the effect's transaction (the rare path).
                await guard.enter(call)
            else:
                guard.granted(opened.permit)
            try:
                found, result = await _effect(conn, call, spec, args, self._keys, locked=opened.locked)
            except psycopg.errors.UniqueViolation:
                # Only a writer that skipped the lock (an older worker) gets here.
                found = await effects.recorded(conn, call.idempotency_key, self._keys)
                if found is None:
                    await guard.failed("UniqueViolation without a recorded effect")
                    raise
            except ToolError as e:
                # Transient failures count against the breaker; a permanent one (order not
                # found, refund too large) proves the tool's dependency answered.
                await (guard.failed(str(e)) if e.retryable else guard.succeeded())
                if isinstance(e, LimitExceeded):  # the effect rolled back; the refusal is recorded
                    await _audit_limit(conn, call, e)
                kind = TOOL_TRANSIENT_ERROR if e.retryable else TOOL_PERMANENT_ERROR
                telemetry.record_tool_call(call.tool, "error", tenant=call.tenant, error_type=kind)
                # The cause travels too (failure chain, worker log): redact it in place.
                e.args = (redact(str(e)),)
                raise ApplicationError(
                    f"{call.tool}: {redact(str(e))}", type=kind, non_retryable=not e.retryable
                ) from e
            except asyncio.CancelledError:
                raise  # not the tool's fault; a claimed probe is freed by its lease
            except Exception as e:  # infrastructure: database, network, a bug in the tool
                if isinstance(e, ApplicationError) and e.non_retryable:
                    await guard.succeeded()
                else:
                    await guard.failed(f"{type(e).__name__}: {e}")
                telemetry.record_tool_call(
                    call.tool,
                    "error",
                    tenant=call.tenant,
                    error_type=getattr(e, "type", None) or type(e).__name__,
                )
                raise
            await guard.succeeded()
            if found is not None:
                return _replayed(call, found)
        assert result is not None
        annotate(cost_micros=result.cost_micros)
        telemetry.record_tool_call(call.tool, "ok", tenant=call.tenant)
        telemetry.record_cost(result.cost_micros, tenant=call.tenant, kind="tool", tool=call.tool)
        return effects.shrink(result, call.idempotency_key)


def _replayed(call: ToolCall, found: ToolResult) -> ToolResult:
    """Answer an attempt whose key already has a record: the effect, or the fence's verdict."""
    if not found.ok:  # the workflow abandoned this step: acting now would be an unreported effect
        raise ApplicationError(
            f"{call.tool}: step abandoned by the run; not acting on it",
            type=STEP_ABANDONED,
            non_retryable=True,
        )
    annotate(replayed=True)
    telemetry.record_tool_call(call.tool, "replayed", tenant=call.tenant)
    return found


HEARTBEAT_EVERY_S = 1.0
"""Tools heartbeat while they run so a dead worker's activity is retried in seconds, not at
its start-to-close timeout (the workflow sets a short heartbeat timeout)."""


async def _with_heartbeats(work: Any) -> Any:
    async with heartbeating(HEARTBEAT_EVERY_S):  # first beat after a second: quick tools cost none
        return await work


_STEP_OPEN_SQL = (
    "select o.*, set_config('synchronous_commit', 'off', true) from keel_tool_step_open("
    "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, "
    "%s, %s::text[], %s::bigint, %s::bigint, %s::int, %s::int, %s, %s, %s, %s, %s, %s) o"
)
"""The permission row and the hold, after a look at the key's record and the breaker
(migration 015). Its transaction commits without waiting for its WAL flush: the effect's
transaction, later on this connection, flushes the WAL past it. A database crash in between
loses only a hold and an audit row whose effect never happened (the retry re-reserves under
the same key); an effect is never durable without its decision."""


@dataclass(frozen=True)
class _Opened:
    """Where ``_open_step`` left the step."""

    found: ToolResult | None = None
    """The key's record: a replay (or the fence's verdict); nothing else happened."""
    refused: ToolResult | None = None
    """The ledger said DENY, or caps switched an optional step off: the tool must not run."""
    permit: breaker.Permit | None = None
    """The closed breaker's permit, read without a write; None: ``acquire`` it first."""
    locked: bool = False
    """The connection is inside the effect's transaction, holding the key's lock, and the
    key has no record: the tool may run."""


async def _open_step(
    conn: psycopg.AsyncConnection[Any], call: ToolCall, optional: bool, scope: str, keys: KeyRing | None
) -> _Opened:
    """Everything before the tool runs, in ONE pipelined round trip on the normal path.

    With a gate: ``BEGIN``; ``keel_tool_step_open`` (migration 015) reads the key's record
    and the breaker's state and, only when the key has no record, appends the permission
    decision's audit row and places the step's budget reservation; ``COMMIT AND CHAIN``
    (a short transaction of its own: the tenant's audit head and the budget rows are not held
    while the tool runs; the chained one is the effect's) and ``keel_tool_effect_lock``:
    the key's lock, and a second look at the record under it (another attempt may have acted
    in between). A record found first means a replay: no audit row, no hold, the breaker
    never sees it, and the effect's transaction is rolled back unused. So is it when the
    breaker is not closed (its probe claim must commit on its own, the rare path).

    The workflow made the (deterministic) decision; this makes it durable before any effect.
    A ledger DENY, or caps that switch an optional step off, return a refusal instead.
    """
    key = call.idempotency_key
    gate = call.gate
    if gate is None:  # nothing to write first: this is the effect's transaction already
        async with conn.pipeline():
            await conn.execute("begin")
            looked = await conn.execute(*effects.lock_statement(key), prepare=True)
            peeked = await conn.execute(*breaker.peek_statement(scope), prepare=True)
        # Fetched after the pipeline's one sync (a fetch inside it costs a sync of its own).
        found = effects.from_row(await looked.fetchone(), key, keys)
        permit = breaker.closed_permit(await peeked.fetchone())
        if found is not None or permit is None:
            await conn.execute("rollback")
        return _Opened(found=found, permit=permit, locked=found is None and permit is not None)
    base = dict(
        tenant=call.tenant,
        user=call.user,
        workflow_id=call.workflow_id,
        step_id=call.step_id,
        subject=call.tool,
    )
    _, entry = audit.append_statement(
        AuditEntry(
            **base,
            kind="permission",
            decision="allow",
            reason=gate.reason,
            data={
                "rule": gate.rule,
                "args": redact_data(call.args),
                **({"provenance": gate.provenance} if gate.provenance else {}),
                **({"approved_by": gate.approved_by} if gate.approved_by else {}),
            },
            idem_key=f"{call.workflow_id}/{call.step_id}/permission",
        )
    )
    hold = ledger.reserve_statement(
        tool_hold(
            key=call.reservation_key,
            scopes=gate.scopes,
            amount_micros=gate.amount_micros,
            tool=call.tool,
            run_id=call.workflow_id,
            step_id=call.step_id,
            ttl=gate.hold_ttl_seconds,
        )
    )
    with ledger.refusals():
        async with conn.pipeline():
            await conn.execute("begin")
            opening = await conn.execute(_STEP_OPEN_SQL, (key, scope, *entry, *hold.params), prepare=True)
            # Commits the decision and the hold and begins the effect's transaction, in one
            # statement. The ``set_config(..., true)`` above ends with the first transaction:
            # the effect's commits with the server's synchronous_commit (tests/test_step_cost.py).
            await conn.execute("commit and chain")
            looked = await conn.execute(*effects.lock_statement(key), prepare=True)
    row = await opening.fetchone()
    assert row is not None
    record, state, opened_until, lease_until, now, failures, reserved = row[:7]
    found = effects.from_row((record,), key, keys)
    if found is not None:  # a replay: nothing was written, nothing is done under the lock
        await conn.execute("rollback")
        return _Opened(found=found)
    permit = breaker.closed_permit(
        None if state is None else (state, opened_until, lease_until, now, failures)
    )
    res = ledger.reserve_result((reserved,))
    found = effects.from_row(await looked.fetchone(), key, keys)
    locked = True
    telemetry.record_budget_decision(res.decision.value, tenant=call.tenant, kind="tool")
    who = {k: base[k] for k in ("tenant", "user", "workflow_id", "step_id")}
    # An observe-mode scope's would-be decision is a row of its own (issue 17).
    observed = audit.observed_entry(
        res, **who, key=call.reservation_key, subject=call.tool, requested_micros=gate.amount_micros
    )
    rows = [observed] if observed is not None else []
    refuse = res.decision == Decision.DENY or (optional and res.caps.disable_optional)
    if found is not None or refuse or rows or permit is None:
        # Nothing was done under the lock. Audit rows are written outside the effect's
        # transaction (they lock the tenant's head, which must not wait on the tool);
        # ``_effect`` then takes the key's lock itself (the rare path). A breaker that is
        # not closed is entered outside the effect's transaction (see ``_run``).
        await conn.execute("rollback")
        locked = False
    if found is not None:
        if rows:
            await audit.append_many(conn, rows)
        return _Opened(found=found)
    if res.decision == Decision.DENY:
        rows.append(
            AuditEntry(
                **base,
                kind="budget",
                decision="deny",
                reason=res.reason,
                data={"requested_micros": gate.amount_micros},
                idem_key=f"{call.workflow_id}/{call.step_id}/budget",
            )
        )
        await audit.append_many(conn, rows)
        return _Opened(refused=ToolResult(ok=False, refused="budget", error=res.reason))
    if refuse:
        await ledger.release(
            conn, ReleaseRequest(key=call.reservation_key, reason="optional step disabled by caps")
        )
        rows.append(
            audit.budget_change_entry(
                **who,
                key=call.reservation_key,
                subject=call.tool,
                decision="skipped_optional",
                reason=f"optional step {call.tool} skipped: little budget left, caps switch optional "
                f"steps off ({res.reason or 'caps'})",
                data={
                    "caps": res.caps.model_dump(exclude_defaults=True),
                    "granted_micros": res.granted_micros,
                },
            )
        )
        await audit.append_many(conn, rows)
        return _Opened(
            refused=ToolResult(ok=False, refused="optional", error="optional step disabled by budget caps")
        )
    if rows:
        await audit.append_many(conn, rows)
    return _Opened(permit=permit, locked=locked)


async def _audit_limit(conn: psycopg.AsyncConnection[Any], call: ToolCall, e: LimitExceeded) -> None:
    """One ``deny`` row for a call the tool's own limit check refused (after the gate's
    ``allow`` row): the rule, the sum it would have reached, and that the tool decided."""
    await audit.append_many(
        conn,
        [
            AuditEntry(
                tenant=call.tenant,
                user=call.user,
                workflow_id=call.workflow_id,
                step_id=call.step_id,
                kind="permission",
                subject=call.tool,
                decision="deny",
                reason=redact(str(e))[:500],
                data={
                    "rule": e.rule,
                    "amount": e.amount,
                    "enforced_by": "tool",
                    "args": redact_data(call.args),
                },
                idem_key=f"{call.workflow_id}/{call.step_id}/limit",
            )
        ],
    )


async def _effect(
    conn: psycopg.AsyncConnection[Any],
    call: ToolCall,
    spec: Any,
    args: Any,
    keys: KeyRing | None,
    *,
    locked: bool,
) -> tuple[ToolResult | None, ToolResult | None]:
    """Run the tool at most once per key: in one transaction under the key's advisory lock,
    its own writes, its ``tool_effects`` record and the ledger commit of the step's
    reservation become durable together or not at all. Returns ``(found, None)`` when the
    key already has a record, else ``(None, result)``.

    Attempts on one key are serialised for the whole attempt: the loser waits at the lock,
    then finds the winner's record instead of acting again. ``locked``: ``_open_step`` has
    already begun the transaction, taken the lock and found no record (one round trip
    saved). Any error rolls the transaction back before it propagates.
    """
    key = call.idempotency_key
    try:
        if not locked:
            async with conn.pipeline():
                await conn.execute("begin")
                looked = await conn.execute(*effects.lock_statement(key), prepare=True)
            found = effects.from_row(await looked.fetchone(), key, keys)
            if found is not None:
                await conn.execute("rollback")
                return found, None
        ctx = ToolContext(conn=conn, tenant=call.tenant, user=call.user, idempotency_key=key, gate=call.gate)
        data = await spec.fn(ctx, args)
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            # The transaction is begun by hand (so it can share a round trip with the gate's),
            # and psycopg does not forbid a tool's own commit() or rollback() inside it: any
            # writes already committed stand without a record, so say so and never retry.
            raise ApplicationError(
                f"{call.tool}: the tool ended the effect's transaction itself (commit or "
                "rollback on ctx.conn); its effect is not recorded",
                type=TOOL_ENDED_TRANSACTION,
                non_retryable=True,
            )
        result = ToolResult(
            ok=True,
            data=data,
            summary=summarize_result(call.tool, data),
            cost_micros=spec.info.cost_micros,
        )
        # The record, the ledger commit and COMMIT go out in one round trip, the first two
        # as ONE statement: the insert is a data-modifying CTE, which PostgreSQL runs to
        # completion whether or not the ledger's select reads it; either failing fails both.
        record = effects.record_statement(key, call.tool, call.tenant, result, keys)
        if call.reservation_key:
            settle = ledger.commit_statement(
                CommitRequest(key=call.reservation_key, actual_micros=result.cost_micros)
            )
            record = (f"with recorded as ({record[0]}) {settle.sql}", (*record[1], *settle.params))
        with ledger.refusals():
            async with conn.pipeline():
                await conn.execute(*record, prepare=True)
                await conn.execute("commit")
        return None, result
    except BaseException:
        await _abandon(conn)
        raise


async def _abandon(conn: psycopg.AsyncConnection[Any]) -> None:
    """Roll back whatever transaction an error left open (the breaker's bookkeeping and the
    caller's handlers then run on a clean connection). A broken connection is the pool's."""
    if conn.broken or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return
    with contextlib.suppress(psycopg.Error):
        await conn.execute("rollback")


class _Guard:
    """The tool's circuit breaker around one call; its bookkeeping never masks the call's
    own outcome (a breaker write that fails is logged, the tool's error still propagates)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], scope: str, *, probe_lease_seconds: float) -> None:
        self.conn, self.scope, self._lease = conn, scope, probe_lease_seconds

    # Built when the breaker is written to (the rare path): a healthy call's fast path needs
    # neither the environment's settings nor a fresh owner id.
    @functools.cached_property
    def cfg(self) -> breaker.BreakerConfig:
        return breaker.config_from_env(probe_lease_seconds=self._lease)

    @functools.cached_property
    def owner(self) -> str:
        return f"{breaker.WORKER_ID}/{uuid.uuid4().hex[:12]}"

    def granted(self, permit: breaker.Permit) -> None:
        """The permit a closed breaker gave without a write (``breaker.closed_permit``)."""
        self.permit = permit
        annotate(breaker_state=permit.state, breaker_probe=None)

    async def enter(self, call: ToolCall) -> None:
        permit = await breaker.acquire(self.conn, self.scope, self.cfg, self.owner)
        self.permit = permit
        annotate(breaker_state=permit.state, breaker_probe=permit.probe or None)
        if not permit.allowed:
            telemetry.record_tool_call(call.tool, "circuit_open", tenant=call.tenant)
            # A compensation must eventually run: it waits out the cooldown instead.
            raise breaker.circuit_open_error(
                self.scope, permit, retryable=call.idempotency_key.endswith("/compensate")
            )

    async def succeeded(self) -> None:
        permit = getattr(self, "permit", None)
        if permit is not None and permit.state == "closed" and permit.failures == 0:
            return  # fast path: a healthy breaker has nothing to reset, so no row is locked
        try:
            await breaker.record_success(self.conn, self.scope, self.owner)
        except Exception as e:
            log.warning("breaker %s: could not record success: %s", self.scope, e)

    async def failed(self, error: str) -> None:
        try:
            await breaker.record_failure(self.conn, self.scope, self.cfg, self.owner, error)
        except Exception as e:
            log.warning("breaker %s: could not record failure: %s", self.scope, e)
