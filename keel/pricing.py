"""Model prices and integer cost arithmetic for the budget ledger.

Prices are stored as integer micro-USD per million tokens (``$0.15/Mtok`` is ``150_000``), so
``tokens * price`` is an exact integer and a cost is one ceiling division away: no float ever
reaches the ledger, and rounding always goes against the spender (up), never in their favour.

The built-in table covers a handful of current models (list prices, standard tier, 5-minute
cache writes for Anthropic). ``KEEL_PRICES_FILE`` names a JSON file whose entries replace or
extend it — needed for any model served by an OpenAI-compatible server, e.g.::

    {"openai:llama3.1": {"input": 0, "output": 0},
     "openai:gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.6}}

Values are USD per million tokens; ``cached_input`` and ``cache_write`` default to ``input``.
The module is pure standard library so workflow code may import it, but reading the
environment and the file is I/O the workflow sandbox forbids: workflow code passes an explicit
``prices`` table (``DEFAULT_PRICES``, or one an activity returned from :func:`load_prices`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from keel.models import Usage

__all__ = [
    "DEFAULT_PRICES",
    "Price",
    "PricingError",
    "cost_micros",
    "estimate_micros",
    "load_prices",
    "price_for",
]

_PER_MTOK = 1_000_000
_FIELDS = ("input", "cached_input", "output", "cache_write")
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


class PricingError(ValueError):
    """A model has no price, or ``KEEL_PRICES_FILE`` is malformed. Configuration, not luck."""


@dataclass(frozen=True, slots=True)
class Price:
    """Prices in integer micro-USD per million tokens (``1_000_000`` is $1 per Mtok)."""

    input: int
    """Uncached input tokens."""
    cached_input: int
    """Input tokens read from the provider's prompt cache."""
    output: int
    """Output tokens, reasoning tokens included."""
    cache_write: int
    """Input tokens written to the prompt cache (Anthropic charges extra; OpenAI does not)."""


def _usd(input: str, cached_input: str, output: str, cache_write: str | None = None) -> Price:
    def micros(usd: str) -> int:
        return int(Decimal(usd) * _PER_MTOK)

    return Price(micros(input), micros(cached_input), micros(output), micros(cache_write or input))


DEFAULT_PRICES: dict[str, Price] = {
    "openai:gpt-4o-mini": _usd("0.15", "0.075", "0.60"),
    "openai:gpt-4.1-mini": _usd("0.40", "0.10", "1.60"),
    "openai:gpt-4.1": _usd("2.00", "0.50", "8.00"),
    "openai:o3": _usd("2.00", "0.50", "8.00"),
    "anthropic:claude-haiku-4-5": _usd("1.00", "0.10", "5.00", "1.25"),
    "anthropic:claude-sonnet-4-5": _usd("3.00", "0.30", "15.00", "3.75"),
    "anthropic:claude-opus-4-1": _usd("15.00", "1.50", "75.00", "18.75"),
    # Nominal: the offline model costs nothing, but a non-zero price (that of a cheap hosted
    # model) makes budgets, caps and the ledger behave offline exactly as they would live.
    "offline": _usd("0.15", "0.075", "0.60"),
}
"""Built-in list prices, keyed ``provider:name`` (or ``offline``)."""


def price_for(model: str, prices: Mapping[str, Price] | None = None) -> Price:
    """The price of ``model`` (``provider:name`` or ``offline``).

    A dated snapshot (``openai:gpt-4.1-2025-04-14``) falls back to its undated entry; other
    suffixes do not, so ``o3-pro`` is never priced as ``o3``. ``prices`` defaults to
    :func:`load_prices` (environment and file: activities only).

    Raises:
        PricingError: if no price is known, or ``KEEL_PRICES_FILE`` is invalid.
    """
    table = load_prices() if prices is None else prices
    key = "offline" if model.split(":", 1)[0] == "offline" else model
    for candidate in (key, _DATE_SUFFIX.sub("", key)):
        if candidate in table:
            return table[candidate]
    raise PricingError(f"no price for model {model!r}: add it to the JSON file named by KEEL_PRICES_FILE")


def cost_micros(model: str, usage: Usage, prices: Mapping[str, Price] | None = None) -> int:
    """Actual cost of a call in integer micro-USD, rounded up.

    ``usage.input_tokens`` is the total input; the cached and cache-write parts of it are
    priced at their own rates and the rest at the full input rate.
    """
    p = price_for(model, prices)
    cached = max(usage.cached_input_tokens, 0)
    written = max(usage.cache_write_tokens, 0)
    plain = max(usage.input_tokens - cached - written, 0)
    total = (
        plain * p.input
        + cached * p.cached_input
        + written * p.cache_write
        + max(usage.output_tokens, 0) * p.output
    )
    return -(-total // _PER_MTOK)


def estimate_micros(
    model: str, input_tokens: int, max_tokens: int, prices: Mapping[str, Price] | None = None
) -> int:
    """Worst-case cost before a call, for a budget reservation: every output token used, no
    cache hit, and input at the dearer of the input and cache-write rates (the Anthropic
    provider marks prompts for caching, and a first call writes the cache at 1.25x)."""
    p = price_for(model, prices)
    total = max(input_tokens, 0) * max(p.input, p.cache_write) + max(max_tokens, 0) * p.output
    return -(-total // _PER_MTOK)


_cache: tuple[tuple[str, int], dict[str, Price]] | None = None


def load_prices() -> dict[str, Price]:
    """The built-in table merged with ``KEEL_PRICES_FILE`` (re-read when the file changes)."""
    global _cache
    path = os.environ.get("KEEL_PRICES_FILE")
    if not path:
        return DEFAULT_PRICES
    try:
        stamp = (path, os.stat(path).st_mtime_ns)
    except OSError as e:
        raise PricingError(f"KEEL_PRICES_FILE {path}: cannot read ({e.strerror})") from e
    if _cache is not None and _cache[0] == stamp:
        return _cache[1]
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise PricingError(f"KEEL_PRICES_FILE {path}: not valid JSON ({e})") from e
    table = {**DEFAULT_PRICES, **_parse(path, raw)}
    _cache = (stamp, table)
    return table


def _parse(path: str, raw: Any) -> dict[str, Price]:
    if not isinstance(raw, dict):
        raise PricingError(f"KEEL_PRICES_FILE {path}: expected an object of model -> prices")
    out: dict[str, Price] = {}
    for model, entry in raw.items():
        where = f"KEEL_PRICES_FILE {path}: {model!r}"
        if model != "offline" and not re.fullmatch(r"(openai|anthropic):\S+", model):
            raise PricingError(f"{where}: model must be 'offline' or 'openai:/anthropic:<name>'")
        if not isinstance(entry, dict):
            raise PricingError(f"{where}: expected an object with input/output prices")
        unknown = sorted(set(entry) - set(_FIELDS))
        if unknown:
            raise PricingError(f"{where}: unknown field(s) {', '.join(unknown)}")
        for required in ("input", "output"):
            if required not in entry:
                raise PricingError(f"{where}: missing {required!r} (USD per million tokens)")
        values = {name: _micros(where, name, entry[name]) for name in _FIELDS if name in entry}
        values.setdefault("cached_input", values["input"])
        values.setdefault("cache_write", values["input"])
        out[model] = Price(**values)
    return out


def _micros(where: str, name: str, value: Any) -> int:
    """USD per Mtok -> integer micro-USD per Mtok, rounded up (never under-charge)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PricingError(f"{where}.{name} must be a number (USD per million tokens)")
    if not math.isfinite(value) or value < 0:
        raise PricingError(f"{where}.{name} must be a finite, non-negative number")
    try:
        return int((Decimal(str(value)) * _PER_MTOK).to_integral_value(rounding=ROUND_CEILING))
    except InvalidOperation as e:  # pragma: no cover - excluded by the checks above
        raise PricingError(f"{where}.{name} is not a usable number") from e
