"""Model prices and integer cost arithmetic for the budget ledger.

Prices come from ``genai-prices`` (pydantic's maintained table of list prices, with context
tiers and cache prices), overlaid by a local override file that wins for the models it names:
``config/prices.yaml`` by default, another with ``KEEL_PRICES_FILE``. The override file is where
the offline model gets its nominal price and where a private or local model (an Ollama or vLLM
model behind ``OPENAI_BASE_URL``) gets its price, usually 0::

    offline: {input: 0.15, cached_input: 0.075, output: 0.60}
    "openai:llama3.1": {input: 0, output: 0}

Values are USD per million tokens; ``cached_input`` and ``cache_write`` default to ``input``.
JSON is YAML, so a JSON file of the same shape works too.

No network: genai-prices bundles its data in the wheel, and fetches newer data only when
asked to (its ``UpdatePrices`` background updater), which Keel never starts, so a price is
what the installed version says until the package is upgraded (``tests/providers/test_pricing.py``
prices with sockets blocked).

Prices are held as integer micro-USD per million tokens (``$0.15/Mtok`` is ``150_000``, rounded
up), so ``tokens * price`` is an exact integer and a cost is one ceiling division away: no float
ever reaches the ledger, and rounding always goes against the spender (up), never in their
favour. A context tier (Anthropic's long-context rates past 200K input tokens) applies to all
tokens of a call whose input passes its threshold, as the providers bill it.

Reading the override file and the genai-prices data is I/O the workflow sandbox forbids: only
activities (and the worker's start-up check) price; a run's workflow gets the prices it needs
in its context, from an activity.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from keel.errors import ConfigError
from keel.models import Usage

__all__ = [
    "DEFAULT_PRICES_FILE",
    "Price",
    "PricingError",
    "cost_micros",
    "estimate_micros",
    "load_prices",
    "price_for",
    "prices_file",
]

_PER_MTOK = 1_000_000
_FIELDS = ("input", "cached_input", "output", "cache_write")
DEFAULT_PRICES_FILE = Path(__file__).resolve().parent.parent / "config" / "prices.yaml"
"""The override file read when ``KEEL_PRICES_FILE`` is unset (a missing one is no overrides)."""
_FIX = "add it to the prices override file (KEEL_PRICES_FILE, default config/prices.yaml)"


class PricingError(ConfigError):
    """A model has no price, or the override file is malformed. Configuration, not luck."""


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
    tiers: tuple[tuple[int, Price], ...] = ()
    """Context tiers ``(threshold, rates)``, ascending: a call whose total input tokens exceed
    ``threshold`` pays ``rates`` for all its tokens (the providers' cliff model)."""
    source: str = ""
    """``genai-prices <version>`` or the override file it came from (for ``doctor``)."""

    def at(self, input_tokens: int) -> Price:
        """The rates a call with ``input_tokens`` of input pays (its context tier's)."""
        for threshold, rates in reversed(self.tiers):
            if input_tokens > threshold:
                return rates
        return self

    def dearest(self) -> Price:
        """The highest rates of any tier (a bound for prompts of unknown size)."""
        return self.tiers[-1][1] if self.tiers else self


def price_for(model: str, prices: Mapping[str, Price] | None = None) -> Price:
    """The price of ``model`` (``provider:name`` or ``offline``).

    ``prices`` (the override table) defaults to :func:`load_prices`; a model it does not name
    is looked up in genai-prices (dated snapshots such as ``gpt-4.1-2025-04-14`` resolve to
    their model; other suffixes do not, so ``o3-pro`` is never priced as ``o3``).

    Raises:
        PricingError: one line, if no price is known or the override file is invalid.
    """
    table = load_prices() if prices is None else prices
    key = "offline" if model.split(":", 1)[0] == "offline" else model
    if key in table:
        return table[key]
    found = _genai_price(key, datetime.now(UTC).date().isoformat())
    if found is None:
        raise PricingError(f"no price for model {model!r}: {_FIX}")
    return found


def cost_micros(model: str, usage: Usage, prices: Mapping[str, Price] | None = None) -> int:
    """Actual cost of a call in integer micro-USD, rounded up.

    ``usage.input_tokens`` is the total input; the cached and cache-write parts of it are
    priced at their own rates and the rest at the full input rate, all at the rates of the
    context tier the total input falls in.
    """
    p = price_for(model, prices).at(usage.input_tokens)
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
    cache hit, input at the dearer of the input and cache-write rates (the Anthropic provider
    marks prompts for caching, and a first call writes the cache at 1.25x), all at the context
    tier of ``input_tokens`` (an upper bound of the prompt, so of its tier too)."""
    p = price_for(model, prices).at(input_tokens)
    total = max(input_tokens, 0) * max(p.input, p.cache_write) + max(max_tokens, 0) * p.output
    return -(-total // _PER_MTOK)


# ---------------------------------------------------------------------------- genai-prices
_genai_cache: dict[tuple[str, str], Price | None] = {}


def _genai_price(model: str, day: str) -> Price | None:
    """``model``'s price in genai-prices' bundled data (``None`` when it has none); cached per
    day, since the data holds dated price changes."""
    hit = _genai_cache.get((model, day), False)
    if hit is not False:
        return hit  # type: ignore[return-value]
    provider, sep, name = model.partition(":")
    price = None
    if sep and name and provider in ("openai", "anthropic"):
        price = _from_genai(provider, name)
    _genai_cache[(model, day)] = price
    return price


def _from_genai(provider: str, name: str) -> Price | None:
    # Imported here: the data module is large (~0.3 s), and the CLI's fast paths never price.
    import genai_prices
    from genai_prices import data_snapshot
    from genai_prices.types import TieredPrices

    try:
        _, info = data_snapshot.get_snapshot().find_provider_model(name, None, provider, None)
    except LookupError:
        return None
    mp = info.get_prices(datetime.now(UTC))
    raw = {
        "input": mp.input_mtok,
        "cached_input": mp.cache_read_mtok,
        "output": mp.output_mtok,
        "cache_write": mp.cache_write_mtok,
    }
    if raw["input"] is None or raw["output"] is None:
        return None  # priced per request or per second, not per token: not a chat model for us
    raw["cached_input"] = raw["cached_input"] if raw["cached_input"] is not None else raw["input"]
    raw["cache_write"] = raw["cache_write"] if raw["cache_write"] is not None else raw["input"]

    def rate(value: Any, input_tokens: int) -> int:
        usd = value.base if isinstance(value, TieredPrices) else value
        if isinstance(value, TieredPrices):
            for tier in reversed(value.tiers):
                if input_tokens > tier.start:
                    usd = tier.price
                    break
        return _to_micros(Decimal(usd))

    def rates(input_tokens: int) -> dict[str, Any]:  # Price(**...) keywords: mypy needs Any
        return {f: rate(raw[f], input_tokens) for f in _FIELDS}

    starts = sorted({t.start for v in raw.values() if isinstance(v, TieredPrices) for t in v.tiers})
    source = f"genai-prices {genai_prices.__version__}"
    tiers = tuple((s, Price(**rates(s + 1), source=source)) for s in starts)
    return Price(**rates(0), tiers=tiers, source=source)


# ---------------------------------------------------------------------------- override file
def prices_file(env: Mapping[str, str] | None = None) -> Path:
    """The override file: ``KEEL_PRICES_FILE``, else ``config/prices.yaml`` of the checkout."""
    e = os.environ if env is None else env
    raw = (e.get("KEEL_PRICES_FILE") or "").strip()
    return Path(raw) if raw else DEFAULT_PRICES_FILE


_cache: tuple[tuple[str, int], dict[str, Price]] | None = None


def load_prices(env: Mapping[str, str] | None = None) -> dict[str, Price]:
    """The override table (re-read when the file changes); ``{}`` when the default file is
    absent. A named ``KEEL_PRICES_FILE`` that cannot be read is an error."""
    global _cache
    path = prices_file(env)
    named = path != DEFAULT_PRICES_FILE
    try:
        stamp = (str(path), os.stat(path).st_mtime_ns)
    except OSError as e:
        if not named:
            return {}
        raise PricingError(f"KEEL_PRICES_FILE {path}: cannot read ({e.strerror})") from e
    if _cache is not None and _cache[0] == stamp:
        return _cache[1]
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PricingError(f"KEEL_PRICES_FILE {path}: not valid YAML ({first})") from e
    table = _parse(path, {} if raw is None else raw)
    _cache = (stamp, table)
    return table


def _parse(path: Path, raw: Any) -> dict[str, Price]:
    if not isinstance(raw, dict):
        raise PricingError(f"KEEL_PRICES_FILE {path}: expected a mapping of model -> prices")
    out: dict[str, Price] = {}
    for model, entry in raw.items():
        where = f"KEEL_PRICES_FILE {path}: {model!r}"
        if not isinstance(model, str) or (
            model != "offline" and not re.fullmatch(r"(openai|anthropic):\S+", model)
        ):
            raise PricingError(f"{where}: model must be 'offline' or 'openai:/anthropic:<name>'")
        if not isinstance(entry, dict):
            raise PricingError(f"{where}: expected a mapping with input/output prices")
        unknown = sorted(set(map(str, entry)) - set(_FIELDS))
        if unknown:
            raise PricingError(f"{where}: unknown field(s) {', '.join(unknown)}")
        for required in ("input", "output"):
            if required not in entry:
                raise PricingError(f"{where}: missing {required!r} (USD per million tokens)")
        values: dict[str, Any] = {
            name: _micros(where, name, entry[name]) for name in _FIELDS if name in entry
        }
        values.setdefault("cached_input", values["input"])
        values.setdefault("cache_write", values["input"])
        out[model] = Price(**values, source=str(path))
    return out


def _micros(where: str, name: str, value: Any) -> int:
    """USD per Mtok -> integer micro-USD per Mtok, rounded up (never under-charge)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PricingError(f"{where}.{name} must be a number (USD per million tokens)")
    if not math.isfinite(value) or value < 0:
        raise PricingError(f"{where}.{name} must be a finite, non-negative number")
    try:
        return _to_micros(Decimal(str(value)))
    except InvalidOperation as e:  # pragma: no cover - excluded by the checks above
        raise PricingError(f"{where}.{name} is not a usable number") from e


def _to_micros(usd_per_mtok: Decimal) -> int:
    return int((usd_per_mtok * _PER_MTOK).to_integral_value(rounding=ROUND_CEILING))
