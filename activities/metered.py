"""Every model call under its own budget hold: reserve before it is sent, commit what it cost.

The activity that spends owns the holds. Each request an activity sends — first try, repair,
truncation retry, a Temporal retry of the whole activity, the judge, the answer — gets a
hold keyed ``<prefix>/call<n>`` (``prefix`` is ``<workflow_id>/<role><iteration>``), where
``n`` is the next number the ledger has not seen under that prefix. The number comes from
the ledger, never from the attempt, so a retried activity continues the count (and a
replayed workflow never re-spends).

A hold charges the run's scopes plus ``<tenant>/model:<provider>:<model>`` for the model
really called (the breaker may move a call to the other provider: :func:`keel.activities.llm.route`
decides first, then the hold is priced). It is committed with the provider-reported usage;
when there is none (timeout, dropped connection, 5xx, a server that omits usage) with the
whole hold, the safe side; a 4xx refusal before the model ran (429, 401, 400) commits zero.

The activity returns — and on failure attaches to its ``ApplicationError`` as the first
detail — :meth:`Meter.report`: the cost of every call under the prefix, earlier attempts
included (read from the ledger), and one record per call. So the workflow's spend report is
the ledger's, whatever failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool
from temporalio.exceptions import ApplicationError

from keel import telemetry
from keel.activities import audit, ledger
from keel.activities.llm import Routed, route, send
from keel.activities.models import add_usage, system_text
from keel.activities.models.errors import (
    BUDGET_DENIED,
    PRICING_ERROR,
    TRUNCATED,
    billed_nothing,
    model_timeout_s,
    repair_instruction,
    usage_of,
)
from keel.budget import (
    CommitRequest,
    IdempotencyConflict,
    LedgerError,
    ReleaseRequest,
    ReserveRequest,
    model_scope,
)
from keel.errors import IDEMPOTENCY_CONFLICT
from keel.models import ChatMessage, Decision, ModelCall, ModelCallRecord, ModelResult, Usage
from keel.pricing import PricingError, cost_micros, estimate_micros, price_for
from keel.tiers import TIER_ORDER

__all__ = [
    "MAX_CALLS_PER_STEP",
    "MIN_OUTPUT_TOKENS",
    "TRUNCATION_GROWTH",
    "Meter",
    "MeterReport",
    "detail_first",
    "estimate_input_tokens",
    "with_report",
]

MAX_CALLS_PER_STEP = 24
"""Model calls one prefix (one plan, judge or answer step, all its attempts together) may
make: a hostile server that keeps failing cannot buy more than this, whatever the budget."""
MIN_OUTPUT_TOKENS = 128
"""A grant that cannot pay for the prompt plus this much output is useless: ask for no less."""
TRUNCATION_GROWTH = 2
"""A reply cut at its output cap is retried once with a cap this many times larger."""
_CHARS_PER_TOKEN = 3
"""Prompt size estimate: 3 characters a token (tokenizers average ~4 on prose), rounded up."""
_FRAMING_TOKENS = 16
"""Per message framing (role markers) and the reply's priming, generously."""

_T = TypeVar("_T")
_ROLES = {"eval": "evaluate", "answer": "respond"}
"""Call record roles by prefix step (``plan``, ``check`` and others are their own name)."""


@dataclass
class MeterReport:
    """What one activity's model calls cost, for its output or its error details."""

    cost_micros: int = 0
    calls: list[ModelCallRecord] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)

    def as_detail(self) -> dict[str, Any]:
        return {
            "cost_micros": self.cost_micros,
            "calls": [c.model_dump(mode="json") for c in self.calls],
            "usage": self.usage.model_dump(),
        }


@contextlib.asynccontextmanager
async def _ledger_refusals() -> AsyncIterator[None]:
    """A reserve key taken by a concurrent attempt (a zombie of a timed-out one) is retried:
    the next attempt reads the ledger again and numbers past it. Other refusals are bugs."""
    try:
        yield
    except IdempotencyConflict as e:
        raise ApplicationError(f"ledger: {e}", type=IDEMPOTENCY_CONFLICT) from e
    except LedgerError as e:
        raise ApplicationError(f"ledger: {e}", type=type(e).__name__, non_retryable=True) from e


def estimate_input_tokens(call: ModelCall) -> int:
    """An upper bound on the prompt's tokens from everything the provider will be sent."""
    chars = len(system_text(call)) + sum(len(m.content) for m in call.messages)
    if call.output_schema is not None:
        chars += len(json.dumps(call.output_schema))
    framing = _FRAMING_TOKENS * (len(call.messages) + 2)
    return framing + -(-chars // _CHARS_PER_TOKEN)


class Meter:
    """The model calls of one activity invocation under one ledger prefix.

    Args:
        pool: the worker's (autocommit) pool; the ledger is reached directly, one round trip
            per reserve and per commit.
        prefix: ``<workflow_id>/<role><iteration>``; unique per activity invocation.
        scopes: the run's scopes (tenant first, run last).
        tier: the cascade tier the calls serve (for the ledger's history and the records).
        start_tier: the run's starting tier (a call above it counts as escalated).
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        prefix: str,
        scopes: tuple[str, ...],
        tier: str = "",
        start_tier: str = "",
        tiers: dict[str, str] | None = None,
        max_calls: int | None = None,
    ) -> None:
        self._pool, self._prefix, self._scopes = pool, prefix, scopes
        self._tier, self._start_tier = tier, start_tier or tier
        self._max_calls = max_calls
        """Calls the run has left for this step (``None``: only :data:`MAX_CALLS_PER_STEP`)."""
        self._sent = 0
        self._tiers = dict(tiers or {})
        """The run's tier → model map: a grant capped to a cheaper tier re-routes the call."""
        self._tenant = scopes[0] if scopes else ""
        self._metered = bool(scopes)
        """No scopes: a run recorded before holds moved here, whose workflow holds one
        reservation for the whole step itself; calls are then only priced, not held."""
        self._next = 0  # 0: not opened yet
        self.report = MeterReport()

    async def _open(self) -> None:
        """Continue the numbering of earlier attempts, and settle what they left held.

        A hold still ``held`` under this prefix belongs to an attempt that died mid-call
        (worker killed, activity timed out): the request may have been billed, and usage
        will never arrive, so it is committed in full now rather than swept back later.
        """
        keys = [f"{self._prefix}/call{n}" for n in range(1, MAX_CALLS_PER_STEP + 1)]
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "select key, status, amount_micros, actual_micros, subject, tier, scopes"
                " from keel_budget_reservations where key = any(%s)",
                (keys,),
            )
            rows = sorted(await cur.fetchall(), key=lambda r: int(r[0].rsplit("/call", 1)[1]))
            used = 0
            for key, status, amount, actual, subject, tier, scopes in rows:
                used = max(used, int(key.rsplit("/call", 1)[1]))
                if status == "held":
                    outcome = "unfinished earlier attempt"
                    try:
                        res = await ledger.commit(
                            conn,
                            CommitRequest(key=key, actual_micros=amount, scopes=tuple(scopes), kind="model"),
                        )
                        actual = res.committed_micros
                    except LedgerError:  # its own attempt committed (or released) it meanwhile
                        cur = await conn.execute(
                            "select status, actual_micros from keel_budget_reservations where key = %s",
                            (key,),
                        )
                        again = await cur.fetchone()
                        status, actual = (again[0], again[1]) if again else ("released", 0)
                else:
                    outcome = "earlier attempt"
                cost = int(actual or 0) if status in ("held", "committed") else 0
                self.report.cost_micros += cost
                self.report.calls.append(
                    ModelCallRecord(
                        role=self._role(),
                        tier=tier,
                        model=subject,
                        cost_micros=cost,
                        key=key,
                        outcome=outcome,
                    )
                )
        self._next = used + 1

    async def settle(self) -> None:
        """Commit what earlier attempts left held and load the step's report, sending nothing."""
        if self._next == 0:
            await self._open()

    def _role(self) -> str:
        step = self._prefix.rsplit("/", 1)[-1].rstrip("0123456789.")
        return _ROLES.get(step, step or "model")

    async def call(self, call: ModelCall) -> ModelResult:
        """Reserve, send, commit one request.

        Raises:
            ApplicationError: ``BudgetDenied`` (non-retryable) when the ledger refuses the
                hold; ``PricingError`` (non-retryable) for a model without a price; any
                provider error of the request (its cost already committed).
        """
        if not self._metered:
            return await self._unmetered(call)
        if self._next == 0:
            await self._open()
        if self._next > MAX_CALLS_PER_STEP:
            raise ApplicationError(
                f"{self._role()}: {MAX_CALLS_PER_STEP} model calls already made for this step; refusing more",
                type=BUDGET_DENIED,
                non_retryable=True,
            )
        if self._max_calls is not None and self._next - 1 >= self._max_calls:
            raise ApplicationError(
                f"the run's cap on model calls is reached ({self._max_calls} left for this step, all used)",
                type=BUDGET_DENIED,
                non_retryable=True,
            )
        routed = await route(call)
        model = routed.call.model
        in_tokens = estimate_input_tokens(routed.call)
        try:
            price = price_for(model).at(in_tokens)  # the context tier the prompt falls in
            amount = estimate_micros(model, in_tokens, call.max_tokens)
            floor = estimate_micros(model, in_tokens, min(MIN_OUTPUT_TOKENS, call.max_tokens))
        except PricingError as e:
            raise ApplicationError(str(e), type=PRICING_ERROR, non_retryable=True) from None
        key = f"{self._prefix}/call{self._next}"
        self._next += 1
        scopes = (*self._scopes, model_scope(self._tenant, model))
        async with self._pool.connection() as conn, _ledger_refusals():
            res = await ledger.reserve(
                conn,
                ReserveRequest(
                    key=key,
                    scopes=scopes,
                    amount_micros=amount,
                    min_micros=floor,
                    max_tokens=call.max_tokens,
                    ttl_seconds=min(86_400, max(300, math.ceil(model_timeout_s() * 2))),
                    kind="model",
                    subject=model,
                    run_id=self._run_id(),
                    step_id=key[len(self._run_id()) + 1 :],
                    tier=self._tier,
                ),
            )
        who = {
            "tenant": self._tenant.split("/", 1)[0],
            "workflow_id": self._run_id(),
            "step_id": key[len(self._run_id()) + 1 :],
        }
        changes = [
            e
            for e in [audit.observed_entry(res, **who, key=key, subject=model, requested_micros=amount)]
            if e is not None
        ]
        if res.decision == Decision.DENY:
            await self._audit(changes)
            self.report.calls.append(self._record(key, model, routed, Usage(), 0, 0.0, "budget_denied"))
            raise ApplicationError(
                f"budget denied the {self._role()} call to {model}: {res.reason or 'no headroom'}",
                type=BUDGET_DENIED,
                non_retryable=True,
            )
        capped = res.caps.max_tier
        if (
            capped in TIER_ORDER
            and self._tier in TIER_ORDER
            and TIER_ORDER.index(capped) < TIER_ORDER.index(self._tier)
            and self._tiers.get(capped)
        ):
            # Little headroom left: the ledger caps the tier. Give this hold back and hold
            # again for the cheaper tier's model (the records show the tier that served).
            async with self._pool.connection() as conn, _ledger_refusals():
                await ledger.release(conn, ReleaseRequest(key=key, reason=f"capped to {capped}"))
            changes.append(
                audit.budget_change_entry(
                    **who,
                    key=key,
                    subject=model,
                    decision="capped_tier",
                    reason=f"{self._role()} call capped from tier {self._tier} to {capped}: "
                    f"{res.reason or 'little budget left'}",
                    data={"from_tier": self._tier, "to_tier": capped, "requested_micros": amount},
                )
            )
            await self._audit(changes)
            self.report.calls.append(self._record(key, model, routed, Usage(), 0, 0.0, f"capped_to_{capped}"))
            self._tier = capped
            return await self.call(call.model_copy(update={"model": self._tiers[capped]}))
        granted = res.granted_micros
        p_in = max(price.input, price.cache_write)
        affordable = (granted * 1_000_000 - in_tokens * p_in) // price.output if price.output > 0 else None
        max_tokens = min(call.max_tokens, res.caps.max_tokens or call.max_tokens)
        if affordable is not None:
            max_tokens = min(max_tokens, affordable)
        sized = routed.call.model_copy(update={"max_tokens": max(1, max_tokens)})
        if sized.max_tokens < call.max_tokens:  # the call's budget cut to what is left
            changes.append(
                audit.budget_change_entry(
                    **who,
                    key=key,
                    subject=model,
                    decision="capped_tokens",
                    reason=f"{self._role()} call to {model} capped at {sized.max_tokens} output tokens "
                    f"(asked {call.max_tokens}): ${granted / 1e6:.6f} granted of ${amount / 1e6:.6f}",
                    data={
                        "asked_tokens": call.max_tokens,
                        "granted_tokens": sized.max_tokens,
                        "requested_micros": amount,
                        "granted_micros": granted,
                    },
                )
            )
        await self._audit(changes)
        try:
            result = await send(Routed(sized, routed.provider, routed.guard, routed.fallback_from))
        except BaseException as e:
            usage = usage_of(e) if isinstance(e, ApplicationError) else None
            if usage is not None:
                actual = cost_micros(model, usage)
            elif isinstance(e, ApplicationError) and billed_nothing(e):
                actual = 0
            else:  # timeout, cancellation, 5xx, dropped connection: maybe billed, unseen
                actual = granted
            outcome = e.type if isinstance(e, ApplicationError) and e.type else type(e).__name__
            await asyncio.shield(self._commit(key, scopes, actual))
            self.report.calls.append(self._record(key, model, routed, usage or Usage(), actual, 0.0, outcome))
            raise
        actual = cost_micros(model, result.usage) if result.usage_known else granted
        await asyncio.shield(self._commit(key, scopes, actual))
        outcome = "truncated" if result.truncated else ("invalid" if result.parse_error else "ok")
        self.report.calls.append(
            self._record(key, model, routed, result.usage, actual, result.latency_ms, outcome)
        )
        self.report.usage = add_usage(self.report.usage, result.usage)
        return result

    async def _unmetered(self, call: ModelCall) -> ModelResult:
        routed = await route(call)
        result = await send(routed)
        try:
            cost = cost_micros(result.model or routed.call.model, result.usage)
        except PricingError as e:
            raise ApplicationError(str(e), type=PRICING_ERROR, non_retryable=True) from None
        self._next += 1
        key = f"{self._prefix}/call{self._next}"
        self.report.cost_micros += cost
        self.report.usage = add_usage(self.report.usage, result.usage)
        self.report.calls.append(
            self._record(key, routed.call.model, routed, result.usage, cost, result.latency_ms, "ok")
        )
        return result

    async def structured(
        self,
        call: ModelCall,
        check: Callable[[dict[str, Any] | None, str], _T],
        *,
        error_type: str,
        what: str,
    ) -> tuple[_T, ModelResult, bool]:
        """One structured answer: truncation retried once larger, one repair, else refused.

        ``check(parsed, parse_error)`` returns the value or raises ``ValueError`` with a reason
        the model can act on. Returns the value, the last result, and whether it was repaired.

        Raises:
            ApplicationError: ``ModelOutputTruncated`` when the reply is still cut at the
                larger cap (or the budget cannot pay for it), ``error_type`` (non-retryable)
                when the repaired answer is still invalid, or whatever :meth:`call` raises.
        """
        result, cap = await self._untruncated(call)
        try:
            return check(result.parsed, result.parse_error), result, False
        except ValueError as first:
            problem = str(first)
        repaired = call.model_copy(
            update={
                "messages": (
                    *call.messages,
                    ChatMessage(role="assistant", content=result.text[:4000] or "(empty reply)"),
                    ChatMessage(role="user", content=repair_instruction(problem)),
                ),
                "max_tokens": cap,
            }
        )
        result, _ = await self._untruncated(repaired)
        try:
            return check(result.parsed, result.parse_error), result, True
        except ValueError as second:
            raise ApplicationError(
                f"{what} refused after one repair: {second}", type=error_type, non_retryable=True
            ) from None  # the message is the reason; no chained ValueError to unwrap

    async def _untruncated(self, call: ModelCall) -> tuple[ModelResult, int]:
        """A reply that was not cut off, and the cap it fitted: a truncated reply is never
        repaired (pasting it back grows the prompt each round), it is asked for again once
        with a larger cap."""
        result = await self.call(call)
        if not result.truncated:
            return result, call.max_tokens
        larger = call.model_copy(update={"max_tokens": call.max_tokens * TRUNCATION_GROWTH})
        try:
            result = await self.call(larger)
        except ApplicationError as e:
            if e.type != BUDGET_DENIED:
                raise
            raise ApplicationError(
                f"model output was cut at its {call.max_tokens}-token cap, and the budget does not "
                f"allow a retry with {larger.max_tokens}: {e.message}",
                type=TRUNCATED,
                non_retryable=True,
            ) from e
        if result.truncated:
            raise ApplicationError(
                f"model output was cut at its output cap twice ({call.max_tokens}, then "
                f"{larger.max_tokens} tokens): the answer does not fit",
                type=TRUNCATED,
                non_retryable=True,
            )
        return result, larger.max_tokens

    async def _commit(self, key: str, scopes: tuple[str, ...], actual: int) -> None:
        async with self._pool.connection() as conn:
            res = await ledger.commit(
                conn, CommitRequest(key=key, actual_micros=actual, scopes=scopes, kind="model")
            )
        self.report.cost_micros += res.committed_micros
        telemetry.annotate(committed_micros=res.committed_micros)

    def _record(
        self,
        key: str,
        model: str,
        routed: Routed,
        usage: Usage,
        cost: int,
        latency_ms: float,
        outcome: str,
    ) -> ModelCallRecord:
        escalated = bool(
            self._tier in TIER_ORDER
            and self._start_tier in TIER_ORDER
            and TIER_ORDER.index(self._tier) > TIER_ORDER.index(self._start_tier)
        )
        return ModelCallRecord(
            role=self._role(),
            tier=self._tier,
            model=model,
            input_tokens=usage.input_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            output_tokens=usage.output_tokens,
            cost_micros=cost,
            latency_ms=latency_ms,
            escalated=escalated,
            key=key,
            fallback_from=routed.fallback_from,
            outcome=outcome,
        )

    async def _audit(self, entries: list[Any]) -> None:
        """Budget decisions that changed this call (issue 17): one row each, nothing if none."""
        if entries:
            async with self._pool.connection() as conn:
                await audit.append_many(conn, entries)

    def _run_id(self) -> str:
        return self._prefix.rsplit("/", 1)[0]


async def with_report(meter: Meter, work: Callable[[], Any]) -> Any:
    """Run ``work``; an ``ApplicationError`` leaving it carries ``meter``'s report as its first
    detail (the same type, message, retryability and retry delay), so the workflow can book
    what the failed activity spent."""
    try:
        return await work()
    except ApplicationError as e:
        raise detail_first(e, meter.report.as_detail()) from e


def detail_first(e: ApplicationError, detail: Any) -> ApplicationError:
    """``e`` with ``detail`` as its first detail: the same message, type, retryability and
    retry delay (the workflow reads what an activity's failure carries from details[0])."""
    return ApplicationError(
        e.message,
        detail,
        *e.details,
        type=e.type,
        non_retryable=e.non_retryable,
        next_retry_delay=e.next_retry_delay,
    )
