"""The one place where model-provider failures become Temporal errors.

Provider clients run with ``max_retries=0``: Temporal owns retries. So every failure must
leave the activity as an :class:`~temporalio.exceptions.ApplicationError` that says whether
retrying can help (429, 5xx, timeouts: yes, after ``retry-after`` if the server sent one;
bad key, bad request, refusal: no) and carries a one-line message an operator can act on.
Messages never contain secrets: provider text is passed through :func:`_redact`.

Callers do ``raise translate_provider_error(e) from e``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from temporalio.exceptions import ApplicationError

from keel.errors import (
    AUTH_ERROR,
    BAD_REQUEST,
    BUDGET_DENIED,
    INVALID_PLAN,
    PRICING_ERROR,
    PROVIDER_ERROR,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    REFUSAL,
    TIMEOUT,
    TRUNCATED,
    UNAVAILABLE,
)
from keel.models import Usage
from keel.redact import redact

__all__ = [
    "AUTH_ERROR",
    "BAD_REQUEST",
    "BUDGET_DENIED",
    "DEFAULT_MODEL_TIMEOUT_S",
    "INVALID_PLAN",
    "PRICING_ERROR",
    "TRUNCATED",
    "billed_nothing",
    "model_timeout_s",
    "NON_RETRYABLE_TYPES",
    "PROVIDER_ERROR",
    "QUOTA_EXCEEDED",
    "RATE_LIMITED",
    "REFUSAL",
    "TIMEOUT",
    "UNAVAILABLE",
    "check_required",
    "missing_key_error",
    "parse_structured",
    "refusal_error",
    "repair_instruction",
    "translate_provider_error",
    "usage_of",
]

# The type names are defined once, in the core (keel.errors), and re-exported here for the
# provider modules and tests that import them from this module.

NON_RETRYABLE_TYPES: tuple[str, ...] = (
    AUTH_ERROR,
    BAD_REQUEST,
    QUOTA_EXCEEDED,
    REFUSAL,
    TRUNCATED,
    BUDGET_DENIED,
    PRICING_ERROR,
    INVALID_PLAN,
)
"""Error types that are always raised with ``non_retryable=True`` (for retry policies/docs)."""

MAX_RETRY_AFTER = timedelta(minutes=10)
"""Cap on a server-supplied ``retry-after``: a bogus huge value must not park a run for hours."""

_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
_SECRET_PATTERN = re.compile(r"(sk-[A-Za-z0-9_\-*]{6,}|Bearer\s+\S+)")
_MAX_DETAIL = 200


def translate_provider_error(exc: BaseException, provider: str | None = None) -> BaseException:
    """Map an exception raised while calling a provider to a Temporal ``ApplicationError``.

    Args:
        exc: What the SDK (or the network) raised.
        provider: ``"openai"`` or ``"anthropic"``; inferred from the exception's module if
            omitted.

    Returns:
        ``exc`` itself if it already is an ``ApplicationError`` (translation is idempotent) or
        a cancellation (never disguised), otherwise a new ``ApplicationError`` with a ``type``
        from this module.
    """
    if isinstance(exc, (ApplicationError, asyncio.CancelledError)):
        return exc
    name = provider or _provider_of(exc)
    status = getattr(exc, "status_code", None)
    if isinstance(exc, _sdk("APIStatusError")) and isinstance(status, int):
        return _from_status(name, status, exc)
    if isinstance(exc, (*_sdk("APITimeoutError"), TimeoutError)):
        return ApplicationError(f"{name}: request timed out", type=TIMEOUT)
    if isinstance(exc, (*_sdk("APIConnectionError"), ConnectionError)):
        return ApplicationError(f"{name}: cannot reach the API ({type(exc).__name__})", type=UNAVAILABLE)
    if isinstance(exc, _sdk("ContentFilterFinishReasonError")):
        return refusal_error(name, "content filter")
    # Anything else is unexpected (SDK bug, odd response shape): let the retry policy decide.
    return ApplicationError(
        f"{name}: unexpected {type(exc).__name__}: {_redact(str(exc))}", type=PROVIDER_ERROR
    )


DEFAULT_MODEL_TIMEOUT_S = 50.0
"""Per-request HTTP timeout unless ``KEEL_MODEL_TIMEOUT_S`` says otherwise: a plan activity may
make three calls (first try, repair, truncation retry) inside the workflow's 3-minute
start-to-close timeout (3 x 50 s plus the ledger's round trips fit), so a hung request
surfaces as a retryable ``ProviderTimeout`` instead of an activity timeout."""


def model_timeout_s(env: dict[str, str] | None = None) -> float:
    """The request timeout from ``KEEL_MODEL_TIMEOUT_S`` (seconds, > 0).

    Raises:
        ValueError: one line naming the variable, for a value that is not a positive number.
    """
    raw = (os.environ if env is None else env).get("KEEL_MODEL_TIMEOUT_S") or ""
    if not raw.strip():
        return DEFAULT_MODEL_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"KEEL_MODEL_TIMEOUT_S must be a positive number of seconds, got {raw!r}")
    return value


def billed_nothing(error: ApplicationError) -> bool:
    """True when the provider answered the request with a refusal that bills no tokens.

    A 4xx answer (rate limit, bad key, bad request, quota) means the model never ran. Every
    other failure — 5xx, timeouts, dropped connections, unexpected errors — may have been
    billed with usage we never saw, so the ledger charges such a call its full hold.
    """
    return error.type in (RATE_LIMITED, AUTH_ERROR, BAD_REQUEST, QUOTA_EXCEEDED)


def refusal_error(provider: str, detail: str = "", usage: Usage | None = None) -> ApplicationError:
    """The model or the provider's filter declined to answer; the same prompt will again.

    A refusal inside a 200 answer was billed: its ``usage`` travels as the first detail, as
    ``{"usage": {...}}``, for the ledger (see :func:`usage_of`)."""
    suffix = f": {_redact(detail)}" if detail else ""
    details = ({"usage": usage.model_dump()},) if usage is not None else ()
    return ApplicationError(
        f"{provider}: the model refused or output was filtered{suffix}",
        *details,
        type=REFUSAL,
        non_retryable=True,
    )


def usage_of(error: ApplicationError) -> Usage | None:
    """The billed usage a provider error carries, if the provider reported one."""
    for detail in error.details:
        if isinstance(detail, dict) and isinstance(detail.get("usage"), dict):
            return Usage.model_validate(detail["usage"])
    return None


def missing_key_error(provider: str) -> ApplicationError:
    """No credential in the worker's environment: fail fast, retrying cannot fix it."""
    env = _KEY_ENV.get(provider, "the API key")
    return ApplicationError(
        f"{provider}: {env} is not set in the worker's environment",
        type=AUTH_ERROR,
        non_retryable=True,
    )


def parse_structured(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    """Find the JSON object in model text and check the schema's top-level ``required`` keys.

    Lenient where that is safe: the reply may be the object itself, or carry it in a
    Markdown fence anywhere, or inside prose ("Here is the plan: {...} Hope it helps") — the
    first complete JSON object found wins. Nothing is invented: a reply with no complete
    object is an error. Full validation is the caller's job (pydantic).

    Raises:
        ValueError: with a short reason suitable to send back to the model.
    """
    body = text.strip()
    if not body:
        raise ValueError("the output was empty")
    try:
        return check_required(json.loads(body), schema)
    except json.JSONDecodeError as e:
        whole_error = e
    for candidate in _json_candidates(body):
        return check_required(candidate, schema)
    w = whole_error
    raise ValueError(f"no JSON object found (invalid JSON: {w.msg} at line {w.lineno} column {w.colno})")


_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)```", flags=re.DOTALL)
_MAX_SCAN = 64
"""Opening braces tried in one reply: bounded work on a hostile, brace-stuffed answer."""


def _json_candidates(body: str) -> Iterator[dict[str, Any]]:
    """JSON objects in ``body``: fenced blocks first, then the first decodable ``{...}``."""
    for block in _FENCE.findall(body):
        try:
            value = json.loads(block.strip())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            yield value
            return
    decoder = json.JSONDecoder()
    start, tried = body.find("{"), 0
    while start != -1 and tried < _MAX_SCAN:
        tried += 1
        try:
            value, _ = decoder.raw_decode(body, start)
        except json.JSONDecodeError:
            start = body.find("{", start + 1)
            continue
        if isinstance(value, dict):
            yield value
            return
        start = body.find("{", start + 1)


def check_required(value: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """Require a JSON object holding the schema's top-level ``required`` properties."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    missing = [k for k in schema.get("required", ()) if k not in value]
    if missing:
        known = set(schema.get("properties") or {})
        others = sorted(str(k) for k in value if k not in known)[:5]
        hint = f" (the object has {', '.join(map(repr, others))} instead)" if others else ""
        raise ValueError(f"missing required field(s): {', '.join(map(str, missing))}{hint}")
    return value


def repair_instruction(error: str) -> str:
    """The user turn of the single repair round: what was wrong, and what to send instead."""
    return (
        f"Your previous reply could not be used: {error}. Reply again with only the corrected "
        "JSON object that satisfies the schema, with no prose and no code fences."
    )


def _from_status(provider: str, status: int, exc: BaseException) -> ApplicationError:
    detail = _detail(exc)
    if status == 429 and _error_code(exc) == "insufficient_quota":
        # OpenAI signals an exhausted account as 429; waiting does not refill it.
        return ApplicationError(
            f"{provider}: quota exhausted (429) — check billing",
            type=QUOTA_EXCEEDED,
            non_retryable=True,
        )
    if status == 429:
        return ApplicationError(
            f"{provider}: rate limited (429){detail}",
            type=RATE_LIMITED,
            next_retry_delay=_retry_after(exc),
        )
    if status in (408, 409) or status >= 500:
        return ApplicationError(
            f"{provider}: unavailable ({status}){detail}",
            type=TIMEOUT if status == 408 else UNAVAILABLE,
            next_retry_delay=_retry_after(exc),
        )
    if status in (401, 403):
        # The provider's own text may echo part of the key: say nothing more than this.
        what = "authentication failed" if status == 401 else "permission denied"
        env = _KEY_ENV.get(provider, "the API key")
        return ApplicationError(
            f"{provider}: {what} ({status}) — check {env}", type=AUTH_ERROR, non_retryable=True
        )
    if status == 402:
        return ApplicationError(
            f"{provider}: payment required (402) — check billing",
            type=QUOTA_EXCEEDED,
            non_retryable=True,
        )
    return ApplicationError(
        f"{provider}: request rejected ({status}){detail}", type=BAD_REQUEST, non_retryable=True
    )


def _retry_after(exc: BaseException) -> timedelta | None:
    """Read ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date) from the response."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    seconds: float | None = None
    raw_ms = headers.get("retry-after-ms")
    raw = headers.get("retry-after")
    try:
        if raw_ms is not None:
            seconds = float(raw_ms) / 1000
        elif raw is not None:
            seconds = float(raw)
    except ValueError:
        seconds = None
    if seconds is None and raw:
        parsed = email.utils.parsedate_tz(raw)
        if parsed is not None:
            seconds = email.utils.mktime_tz(parsed) - time.time()
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(timedelta(seconds=max(seconds, 0.0)), MAX_RETRY_AFTER)


def _error_code(exc: BaseException) -> str | None:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            code = inner.get("code") or inner.get("type")
            return str(code) if code is not None else None
    return None


def _detail(exc: BaseException) -> str:
    """The provider's own error message, one line, redacted and truncated."""
    body = getattr(exc, "body", None)
    message: Any = None
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else None
    text = _redact(str(message)) if message else ""
    return f": {text}" if text else ""


def _redact(text: str) -> str:
    """Drop anything that looks like a credential, and the configured keys themselves."""
    for env in _KEY_ENV.values():
        secret = os.environ.get(env)
        if secret and len(secret) >= 8:
            text = text.replace(secret, "[redacted]")
    # Masked keys (``sk-test-***0000``) first, then every detector of ``keel.redact``.
    text = redact(_SECRET_PATTERN.sub("[redacted]", text))
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def _sdk(name: str) -> tuple[type[BaseException], ...]:
    """Exception class ``name`` from each SDK already imported.

    Looked up in ``sys.modules`` instead of imported: an SDK that was never loaded cannot have
    raised anything, and an offline-only worker then never pays for importing either SDK.
    """
    found = (getattr(sys.modules.get(sdk), name, None) for sdk in ("openai", "anthropic"))
    return tuple(cls for cls in found if isinstance(cls, type))


def _provider_of(exc: BaseException) -> str:
    root = type(exc).__module__.split(".", 1)[0]
    return root if root in _KEY_ENV else "provider"
