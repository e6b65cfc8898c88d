"""Integer cost arithmetic, cache pricing, the price table and its override file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keel.models import Usage
from keel.pricing import DEFAULT_PRICES, PricingError, cost_micros, estimate_micros, price_for
from keel.tiers import ANTHROPIC_TIERS, OPENAI_TIERS


def test_cost_is_integer_micros_rounded_up() -> None:
    # 1000 x $0.15 + 500 x $0.60 per Mtok = 150 + 300 micro-USD, exactly
    cost = cost_micros("openai:gpt-4o-mini", Usage(input_tokens=1000, output_tokens=500))
    assert cost == 450 and type(cost) is int
    # one token costs 0.15 micro-USD: never rounded down to free
    assert cost_micros("openai:gpt-4o-mini", Usage(input_tokens=1)) == 1
    assert cost_micros("openai:gpt-4o-mini", Usage()) == 0


def test_cached_tokens_are_priced_as_cached() -> None:
    full = cost_micros("openai:gpt-4o-mini", Usage(input_tokens=1000))
    cached = cost_micros("openai:gpt-4o-mini", Usage(input_tokens=1000, cached_input_tokens=800))
    assert (full, cached) == (150, 90)  # 200 x 0.15 + 800 x 0.075


def test_anthropic_cache_writes_cost_more_than_input() -> None:
    usage = Usage(input_tokens=1000, cached_input_tokens=300, cache_write_tokens=600)
    # 100 x $1 + 300 x $0.10 + 600 x $1.25 per Mtok
    assert cost_micros("anthropic:claude-haiku-4-5", usage) == 880


def test_estimate_is_a_worst_case() -> None:
    model = "anthropic:claude-sonnet-4-5"
    estimate = estimate_micros(model, input_tokens=2000, max_tokens=1000)
    for usage in (
        Usage(input_tokens=2000, output_tokens=1000),
        Usage(input_tokens=2000, cache_write_tokens=2000, output_tokens=1000),
        Usage(input_tokens=2000, cached_input_tokens=1500, output_tokens=10),
    ):
        assert cost_micros(model, usage) <= estimate


def test_offline_is_nominal_but_not_free() -> None:
    assert price_for("offline") == DEFAULT_PRICES["offline"]
    assert cost_micros("offline", Usage(input_tokens=1000, output_tokens=1000)) == 750


def test_every_default_tier_model_has_a_price() -> None:
    for model in (*ANTHROPIC_TIERS.values(), *OPENAI_TIERS.values(), "openai:o3"):
        assert price_for(model).output > 0


def test_dated_snapshots_resolve_but_other_suffixes_do_not() -> None:
    assert price_for("openai:gpt-4.1-2025-04-14") == price_for("openai:gpt-4.1")
    assert price_for("anthropic:claude-sonnet-4-5-20250929") == price_for("anthropic:claude-sonnet-4-5")
    with pytest.raises(PricingError, match="KEEL_PRICES_FILE"):
        price_for("openai:o3-pro")  # must never be priced as o3
    with pytest.raises(PricingError, match=r"no price for model 'openai:llama3\.1'"):
        cost_micros("openai:llama3.1", Usage(input_tokens=1))


def test_prices_file_overrides_and_extends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "openai:llama3.1": {"input": 0, "output": 0},
                "openai:gpt-4o-mini": {"input": 1, "output": 2, "cached_input": 0.5},
            }
        )
    )
    monkeypatch.setenv("KEEL_PRICES_FILE", str(path))
    assert cost_micros("openai:llama3.1", Usage(input_tokens=10**6)) == 0
    price = price_for("openai:gpt-4o-mini")
    assert (price.input, price.cached_input, price.output, price.cache_write) == (
        1_000_000,
        500_000,
        2_000_000,
        1_000_000,
    )
    assert price_for("openai:gpt-4.1") == DEFAULT_PRICES["openai:gpt-4.1"]
    # an explicit table (what workflow code passes) ignores the environment
    assert price_for("openai:gpt-4o-mini", DEFAULT_PRICES) == DEFAULT_PRICES["openai:gpt-4o-mini"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected an object"),
        ('{"gpt-x": {"input": 1, "output": 1}}', "must be 'offline' or"),
        ('{"openai:x": {"input": 1}}', "missing 'output'"),
        ('{"openai:x": {"input": -1, "output": 1}}', "non-negative"),
        ('{"openai:x": {"input": "1", "output": 1}}', "must be a number"),
        ('{"openai:x": {"input": 1, "ouput": 1, "output": 1}}', "unknown field"),
    ],
)
def test_bad_prices_file_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, message: str
) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    monkeypatch.setenv("KEEL_PRICES_FILE", str(path))
    with pytest.raises(PricingError, match=message) as info:
        price_for("offline")
    assert "\n" not in str(info.value)


def test_missing_prices_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KEEL_PRICES_FILE", str(tmp_path / "absent.json"))
    with pytest.raises(PricingError, match="cannot read"):
        price_for("offline")
