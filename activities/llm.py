"""One model call, heartbeating, with translated errors (``route`` then ``send``).

All model I/O happens here so the workflow only ever sees ``ModelResult`` payloads or
``ApplicationError`` failures whose ``non_retryable`` / ``next_retry_delay`` are already right
for its retry policy. API keys come from this worker's environment, never from the payload.

Each remote provider has a circuit breaker (scope ``model:<provider>``) shared by every worker
in PostgreSQL. When a provider's breaker is open and the worker also holds a key for the other
provider, the call goes to the other provider's model of the same tier instead (the result
names the model that answered, so cost is priced right); otherwise it fails at once with the
non-retryable ``CircuitOpen``. Only outages count as failures (5xx, timeouts, connection
errors, unexpected SDK errors), never bad requests, refusals, bad output or 429s (a rate
limit is retried after its ``retry-after``, see ``keel.activities.models.errors``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel import telemetry
from keel.activities import breaker
from keel.activities.agent_defs import agent_definitions
from keel.activities.heartbeat import heartbeating
from keel.activities.models import split_model
from keel.activities.models.errors import (
    BAD_REQUEST,
    PROVIDER_ERROR,
    TIMEOUT,
    UNAVAILABLE,
    model_timeout_s,
    translate_provider_error,
    usage_of,
)
from keel.activities.models.providers import get_provider
from keel.agent_io import MODEL_ATTEMPTS
from keel.agents import agent_tiers
from keel.models import ModelCall, ModelResult, Usage
from keel.pricing import PricingError, cost_micros, load_prices, price_for, prices_file
from keel.tiers import ANTHROPIC_TIERS, OPENAI_TIERS, resolve_tiers

__all__ = [
    "DEFAULT_MODEL_BREAKER_THRESHOLD",
    "HEARTBEAT_EVERY_S",
    "OUTAGE_ERRORS",
    "Routed",
    "call_model",
    "check_model_config",
    "configured_models",
    "fallback_model",
    "model_breaker_threshold",
    "route",
    "send",
]

HEARTBEAT_EVERY_S = 5.0
"""Heartbeat period while a provider call is in flight: well under any sensible heartbeat
timeout (set it to ~15-30 s), so a dead worker is noticed quickly and cancellation arrives."""

OUTAGE_ERRORS = frozenset({UNAVAILABLE, TIMEOUT, PROVIDER_ERROR})
"""Error types that count against a provider's breaker: the provider, not the request, is
at fault."""

MODEL_PROBE_LEASE_S = 200.0
"""A probe may take as long as a model call may (the workflow's 3-minute timeout)."""

DEFAULT_MODEL_BREAKER_THRESHOLD = 3
"""Consecutive outage failures that open a provider's breaker. It must stay below the plan
step's attempts (``keel.agent_io.MODEL_ATTEMPTS``, 5): the run whose calls open the breaker
then still has attempts left, and they go to the other provider (failover inside the run
that meets the outage, not only in later runs)."""

_KEY_ENV: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY", "OPENAI_BASE_URL"),
    "anthropic": ("ANTHROPIC_API_KEY",),
}


@dataclass(frozen=True)
class Routed:
    """Where one call goes: possibly another provider's model when the breaker sent it there."""

    call: ModelCall
    provider: str
    guard: _ProviderGuard | None = None
    fallback_from: str = ""
    """The model the caller asked for, when the call was moved to another provider."""


async def route(call: ModelCall) -> Routed:
    """Ask the provider's breaker whether ``call`` may go; move it to the other provider's
    model of the same tier when the breaker is open and this worker holds that key.

    Decided before the call's budget is held, so the hold is priced for the model that will
    really be called.

    Raises:
        ApplicationError: ``ProviderBadRequest`` for an unknown model; ``CircuitOpen``
            (non-retryable) when the breaker is open and no other provider can take it.
    """
    try:
        provider_name, _ = split_model(call.model)
    except ValueError as e:
        raise ApplicationError(str(e), type=BAD_REQUEST, non_retryable=True) from e
    pool = breaker.BREAKER_POOL.get()
    if pool is None or provider_name == "offline":
        return Routed(call, provider_name)
    routed, provider, guard = await _guarded(pool, call, provider_name, _tenant())
    return Routed(routed, provider, guard, fallback_from=call.model if routed.model != call.model else "")


async def send(routed: Routed) -> ModelResult:
    """Send one routed call (exactly one provider request), heartbeating, errors translated.

    Raises:
        ApplicationError: every failure, typed by ``keel.activities.models.errors``.
    """
    call, provider_name, guard = routed.call, routed.provider, routed.guard
    tenant = _tenant()
    telemetry.annotate(tenant=tenant, model=call.model, role=call.role)
    provider = get_provider(call.model)
    with telemetry.model_call(
        call, provider=provider_name, tenant=tenant, server=_server(provider_name)
    ) as span:
        started = time.monotonic()
        async with heartbeating(HEARTBEAT_EVERY_S, at_once=True):
            try:
                result = await provider.complete(call)
            except Exception as e:
                err = translate_provider_error(e, provider_name)
                if isinstance(err, ApplicationError):
                    if guard is not None:
                        await guard.outcome(err)
                    telemetry.record_model_call(
                        model=call.model, provider=provider_name, outcome=err.type or "error", tenant=tenant
                    )
                    usage = usage_of(err)
                    span.usage(usage, cost_micros=_cost(call.model, usage) if usage is not None else None)
                if err is e:
                    raise
                raise err from e
        if guard is not None:
            await guard.outcome(None)
        latency_ms = round((time.monotonic() - started) * 1000, 1)
        model = result.model or call.model
        cost = _cost(model, result.usage)
        span.succeeded(result, cost_micros=cost)
    _account(model, provider_name, tenant, result, cost)
    activity.logger.info(
        "model call %s: %d in (%d cached) / %d out tokens in %.0f ms",
        model,
        result.usage.input_tokens,
        result.usage.cached_input_tokens,
        result.usage.output_tokens,
        latency_ms,
    )
    return result.model_copy(update={"latency_ms": latency_ms, "model": model})


async def call_model(call: ModelCall) -> ModelResult:
    """Run ``call`` on the provider its ``model`` names and return the result with latency.

    Unmetered: it holds no budget (the agent's own activities use ``keel.activities.metered``,
    which does). A plain function, not an activity (no workflow schedules one): for code
    inside an activity that needs one raw call.

    Raises:
        ApplicationError: for every failure; unknown models and bad credentials are
            non-retryable, rate limits and outages retryable (see ``keel.activities.models.errors``);
            ``CircuitOpen`` (non-retryable) when the provider's breaker is open and no other
            provider can take the call.
    """
    return await send(await route(call))


def _tenant() -> str:
    wid = activity.info().workflow_id if activity.in_activity() else ""
    return telemetry.tenant_of(wid or "")


def fallback_model(model: str, env: Mapping[str, str]) -> str | None:
    """The other provider's model for the tier ``model`` serves, if this worker has its key.

    ``openai:gpt-4o-mini`` (fast) → ``anthropic:claude-haiku-4-5`` when ``ANTHROPIC_API_KEY``
    is set, and vice versa; ``None`` for the offline model or without the other key.
    """
    provider, _ = split_model(model)
    if provider == "offline":
        return None
    other = "anthropic" if provider == "openai" else "openai"
    other_env = {k: env[k] for k in _KEY_ENV[other] if env.get(k)}
    tiers = resolve_tiers(other_env)  # sees only the other provider's keys
    if all(m == "offline" for m in tiers.values()):
        return None
    return tiers[_tier_of(model, env)]


def model_breaker_threshold(env: Mapping[str, str]) -> int:
    """``KEEL_MODEL_BREAKER_THRESHOLD``, else ``KEEL_BREAKER_THRESHOLD`` lowered below the
    step's attempts, else 3.

    Raises:
        ValueError: one line naming the variable.
    """
    raw = (env.get("KEEL_MODEL_BREAKER_THRESHOLD") or "").strip()
    if not raw:  # the general breaker threshold, kept below the attempts
        general = (env.get("KEEL_BREAKER_THRESHOLD") or "").strip()
        if general.isdigit() and int(general) >= 1:
            return min(int(general), MODEL_ATTEMPTS - 1)
        return DEFAULT_MODEL_BREAKER_THRESHOLD
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value < MODEL_ATTEMPTS:
        raise ValueError(
            f"KEEL_MODEL_BREAKER_THRESHOLD must be an integer from 1 to {MODEL_ATTEMPTS - 1} (below the "
            f"{MODEL_ATTEMPTS} attempts of a model step, so a run can fail over), got {raw!r}"
        )
    return value


def configured_models(env: Mapping[str, str]) -> dict[str, str]:
    """Every model this worker may call, with why: the tiers (the worker's, and each agent
    definition's), and each tier's failover model."""
    base = resolve_tiers(env)
    tables = [("", base)]
    try:
        tables += [(f"agent {n} ", agent_tiers(base, a, env)) for n, (a, _) in agent_definitions().items()]
    except Exception:  # a bad definition is reported by its own check at worker start
        pass
    out: dict[str, str] = {}
    for who, tiers in tables:
        for tier, model in tiers.items():
            out.setdefault(model, f"{who}tier {tier}")
            alt = fallback_model(model, env)
            if alt is not None:
                out.setdefault(alt, f"failover for {model}")
    return out


def check_model_config(env: Mapping[str, str]) -> None:
    """Refuse a worker whose models cannot be charged or whose limits are inconsistent.

    Run at worker start, so a model without a price fails once, in one line that names the
    fix, instead of every run failing in its first activity.

    Raises:
        ValueError: one line (``PricingError`` for a model without a price).
    """
    prices = load_prices()
    for model, why in configured_models(env).items():
        try:
            price_for(model, prices)
        except PricingError as e:
            raise PricingError(
                f"{model} ({why}) has no price in genai-prices: add it to the prices override file "
                f"{prices_file()} (KEEL_PRICES_FILE), e.g. "
                '"' + model + '": {input: 0, output: 0} for a free local model'
            ) from e
    model_timeout_s(dict(env))
    model_breaker_threshold(env)


def _tier_of(model: str, env: Mapping[str, str]) -> str:
    for table in (resolve_tiers(env), OPENAI_TIERS, ANTHROPIC_TIERS):
        for tier, name in table.items():
            if name == model:
                return tier
    return "balanced"  # an unknown model: a middle tier is the safest stand-in


async def _guarded(
    pool: Any, call: ModelCall, provider: str, tenant: str
) -> tuple[ModelCall, str, _ProviderGuard]:
    cfg = breaker.config_from_env(
        probe_lease_seconds=MODEL_PROBE_LEASE_S, failure_threshold=model_breaker_threshold(os.environ)
    )
    owner = f"{breaker.WORKER_ID}/{uuid.uuid4().hex[:12]}"
    scope = f"model:{provider}"
    async with pool.connection() as conn:
        permit = await breaker.acquire(conn, scope, cfg, owner)
        if permit.allowed:
            telemetry.annotate(breaker_state=permit.state, breaker_probe=permit.probe or None)
            return call, provider, _ProviderGuard(pool, scope, cfg, owner)
        alt = fallback_model(call.model, os.environ)
        if alt is not None:
            alt_provider = split_model(alt)[0]
            alt_scope = f"model:{alt_provider}"
            if (await breaker.acquire(conn, alt_scope, cfg, owner)).allowed:
                activity.logger.warning("%s is open: %s falls back to %s", scope, call.model, alt)
                telemetry.annotate(fallback_from=call.model, model=alt)
                return (
                    call.model_copy(update={"model": alt}),
                    alt_provider,
                    _ProviderGuard(pool, alt_scope, cfg, owner),
                )
    telemetry.record_model_call(model=call.model, provider=provider, outcome="circuit_open", tenant=tenant)
    telemetry.annotate(breaker_state=permit.state)
    raise breaker.circuit_open_error(scope, permit)


class _ProviderGuard:
    """Reports one call's outcome to its provider's breaker; never masks the call's error."""

    def __init__(self, pool: Any, scope: str, cfg: breaker.BreakerConfig, owner: str) -> None:
        self.pool, self.scope, self.cfg, self.owner = pool, scope, cfg, owner

    async def outcome(self, error: ApplicationError | None) -> None:
        try:
            async with self.pool.connection() as conn:
                if error is not None and error.type in OUTAGE_ERRORS:
                    await breaker.record_failure(conn, self.scope, self.cfg, self.owner, error.message)
                elif error is None or error.non_retryable:  # the provider answered
                    await breaker.record_success(conn, self.scope, self.owner)
        except Exception as e:
            activity.logger.warning("breaker %s: could not record outcome: %s", self.scope, e)


_DEFAULT_BASE_URL = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
_BASE_URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}


def _server(provider: str) -> tuple[str, int] | None:
    """The endpoint the provider's SDK will call, as the conventions' ``server.address`` and
    ``server.port`` (``None`` for the in-process offline model)."""
    if provider not in _DEFAULT_BASE_URL:
        return None
    url = urlsplit(os.environ.get(_BASE_URL_ENV[provider]) or _DEFAULT_BASE_URL[provider])
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:  # a malformed port: the SDK will say so
        return None
    return (url.hostname, port) if url.hostname else None


def _cost(model: str, usage: Usage) -> int:
    """The call's cost for telemetry; an unpriced model (the ledger refuses it before a
    metered call) must not fail a call that already happened."""
    try:
        return cost_micros(model, usage)
    except Exception:
        return 0


def _account(model: str, provider: str, tenant: str, result: ModelResult, cost: int) -> None:
    telemetry.record_model_call(model=model, provider=provider, outcome="ok", tenant=tenant)
    telemetry.record_cost(cost, tenant=tenant, kind="model", model=model)
    telemetry.annotate(provider=provider)
