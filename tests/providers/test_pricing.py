"""Prices from genai-prices with a local override file: integer micro-USD arithmetic, cache and
context-tier rates as genai-prices says, the override file winning, no network."""

from __future__ import annotations

import json
import socket
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

import genai_prices
import pytest
from genai_prices import data_snapshot

import keel.pricing as pricing
from keel.models import Usage
from keel.pricing import PricingError, cost_micros, estimate_micros, price_for
from keel.tiers import ANTHROPIC_TIERS, OPENAI_TIERS


@pytest.fixture(autouse=True)
def _default_prices_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_PRICES_FILE", raising=False)


def _genai_micros(model: str, usage: Usage) -> int:
    """What genai-prices itself says the call costs, in micro-USD rounded up."""
    provider, name = model.split(":", 1)
    calc = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.input_tokens,
            cache_read_tokens=usage.cached_input_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            output_tokens=usage.output_tokens,
        ),
        model_ref=name,
        provider_id=provider,
    )
    return int((calc.total_price * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


USAGES = (
    Usage(input_tokens=1000, output_tokens=500),
    Usage(input_tokens=1200, cached_input_tokens=1024, output_tokens=40),
    Usage(input_tokens=5000, cached_input_tokens=1000, cache_write_tokens=3000, output_tokens=700),
    Usage(input_tokens=1),
)
MODELS = (
    *OPENAI_TIERS.values(),
    *ANTHROPIC_TIERS.values(),
    "openai:o3",
    "openai:o3-pro",
    "openai:gpt-4.1-2025-04-14",
    "anthropic:claude-sonnet-4-5-20250929",
)


@pytest.mark.parametrize("model", MODELS)
def test_known_models_cost_what_genai_prices_says(model: str) -> None:
    for usage in USAGES:
        if usage.cache_write_tokens and model.startswith("openai:"):
            continue  # OpenAI reports no cache writes
        cost = cost_micros(model, usage)
        assert type(cost) is int and cost == _genai_micros(model, usage), (model, usage)


def test_cost_is_integer_micros_rounded_up() -> None:
    # 1000 x $0.15 + 500 x $0.60 per Mtok = 150 + 300 micro-USD, exactly
    assert cost_micros("openai:gpt-4o-mini", Usage(input_tokens=1000, output_tokens=500)) == 450
    # one token costs 0.15 micro-USD: never rounded down to free
    assert cost_micros("openai:gpt-4o-mini", Usage(input_tokens=1)) == 1
    assert cost_micros("openai:gpt-4o-mini", Usage()) == 0


def test_cache_reads_and_writes_have_their_own_rates() -> None:
    usage = Usage(input_tokens=1000, cached_input_tokens=300, cache_write_tokens=600)
    # 100 x $1 + 300 x $0.10 + 600 x $1.25 per Mtok (genai-prices' Haiku 4.5 rates)
    assert cost_micros("anthropic:claude-haiku-4-5", usage) == 880
    full = cost_micros("openai:gpt-4o-mini", Usage(input_tokens=1000))
    cached = cost_micros("openai:gpt-4o-mini", Usage(input_tokens=1000, cached_input_tokens=800))
    assert (full, cached) == (150, 90)  # 200 x 0.15 + 800 x 0.075


def test_context_tiers_apply_past_their_threshold() -> None:
    model = "anthropic:claude-sonnet-4-5"
    price = price_for(model)
    assert price.tiers, "genai-prices prices Sonnet 4.5's long context higher"
    threshold, long = price.tiers[0]
    assert long.input > price.input and long.output > price.output
    short = Usage(input_tokens=threshold, output_tokens=1000)
    over = Usage(input_tokens=threshold + 1, output_tokens=1000)
    assert cost_micros(model, short) == _genai_micros(model, short)
    assert cost_micros(model, over) == _genai_micros(model, over)
    assert cost_micros(model, over) > cost_micros(model, short) * 1.5  # all tokens at the tier rate
    # the reservation of a long prompt is priced at its tier, and still bounds the actual cost
    assert estimate_micros(model, threshold + 1, 1000) >= cost_micros(
        model, Usage(input_tokens=threshold + 1, cache_write_tokens=threshold + 1, output_tokens=1000)
    )


def test_estimate_is_a_worst_case() -> None:
    model = "anthropic:claude-sonnet-4-5"
    estimate = estimate_micros(model, input_tokens=2000, max_tokens=1000)
    for usage in (
        Usage(input_tokens=2000, output_tokens=1000),
        Usage(input_tokens=2000, cache_write_tokens=2000, output_tokens=1000),
        Usage(input_tokens=2000, cached_input_tokens=1500, output_tokens=10),
    ):
        assert cost_micros(model, usage) <= estimate


def test_offline_is_priced_by_the_shipped_override_file() -> None:
    assert pricing.prices_file() == pricing.DEFAULT_PRICES_FILE
    assert "offline" in pricing.DEFAULT_PRICES_FILE.read_text()
    assert cost_micros("offline", Usage(input_tokens=1000, output_tokens=1000)) == 750


def test_unknown_models_are_refused_in_one_line() -> None:
    for model in ("openai:llama3.1", "anthropic:claude-nonesuch-9", "openai:o3-pro-nonesuch"):
        with pytest.raises(PricingError, match=r"no price for model .*KEEL_PRICES_FILE") as info:
            cost_micros(model, Usage(input_tokens=1))
        assert "\n" not in str(info.value)
    assert price_for("openai:o3-pro").output > price_for("openai:o3").output  # never priced as o3


def test_override_file_wins_over_genai_prices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        "# negotiated rate and a local model\n"
        '"openai:llama3.1": {input: 0, output: 0}\n'
        '"openai:gpt-4o-mini": {input: 1, output: 2, cached_input: 0.5}\n'
    )
    monkeypatch.setenv("KEEL_PRICES_FILE", str(path))
    assert cost_micros("openai:llama3.1", Usage(input_tokens=10**6, output_tokens=10**6)) == 0
    price = price_for("openai:gpt-4o-mini")
    assert (price.input, price.cached_input, price.output, price.cache_write) == (
        1_000_000,
        500_000,
        2_000_000,
        1_000_000,
    )
    assert cost_micros("openai:gpt-4o-mini", Usage(input_tokens=1000)) == 1000  # not genai's 150
    # models the file does not name still come from genai-prices; a file without offline
    # leaves the offline model unpriced (the worker then refuses to start)
    assert cost_micros("openai:gpt-4.1", USAGES[0]) == _genai_micros("openai:gpt-4.1", USAGES[0])
    with pytest.raises(PricingError, match="no price for model 'offline'"):
        price_for("offline")


def test_json_override_files_still_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"offline": {"input": 0, "output": 0}}))
    monkeypatch.setenv("KEEL_PRICES_FILE", str(path))
    assert cost_micros("offline", Usage(input_tokens=1000, output_tokens=1000)) == 0


def test_pricing_makes_no_network_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sockets refused: every lookup (a cold genai-prices cache included) answers from the
    bundled data, and the data is genai-prices' bundled snapshot, never an auto-updated one."""
    opened: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        opened.append(args)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(pricing, "_genai_cache", {})
    for model in MODELS:
        assert cost_micros(model, USAGES[1]) > 0
    assert estimate_micros("offline", 100, 100) > 0
    assert opened == []
    assert data_snapshot.get_snapshot().from_auto_update is False


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not: valid: yaml", "not valid YAML"),
        ("[]", "expected a mapping"),
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
    path = tmp_path / "prices.yaml"
    path.write_text(content)
    monkeypatch.setenv("KEEL_PRICES_FILE", str(path))
    with pytest.raises(PricingError, match=message) as info:
        price_for("offline")
    assert "\n" not in str(info.value)


def test_missing_prices_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KEEL_PRICES_FILE", str(tmp_path / "absent.yaml"))
    with pytest.raises(PricingError, match="cannot read"):
        price_for("offline")


def test_decimal_rates_round_up_to_whole_micros(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text('"openai:tiny": {input: 0.0000001, output: 0.1234567}\n')
    monkeypatch.setenv("KEEL_PRICES_FILE", str(path))
    p = price_for("openai:tiny")
    assert (p.input, p.output) == (1, int(Decimal("123456.7").to_integral_value(rounding=ROUND_CEILING)))


def test_a_fresh_process_prices_with_the_network_off() -> None:
    """Importing genai-prices and the first lookup, in a process whose sockets all refuse."""
    import subprocess
    import sys

    code = (
        "import socket\n"
        "def refuse(*a, **k):\n"
        "    raise SystemExit('network call: %r' % (a,))\n"
        "socket.socket.connect = socket.socket.connect_ex = refuse\n"
        "socket.getaddrinfo = socket.create_connection = refuse\n"
        "from keel.models import Usage\n"
        "from keel.pricing import cost_micros\n"
        "print(cost_micros('anthropic:claude-sonnet-4-5', Usage(input_tokens=1000, output_tokens=100)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(
        _genai_micros(
            "anthropic:claude-sonnet-4-5",
            USAGES[0].model_copy(update={"input_tokens": 1000, "output_tokens": 100}),
        )
    )
