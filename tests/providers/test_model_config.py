"""A worker refuses, at start and in one line, models it could not charge or fail over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from keel.activities.llm import check_model_config, configured_models
from keel.pricing import PricingError
from keel.settings import PROJECT_ROOT, load_settings, offline_env

LOCAL = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "KEEL_MODEL_FAST": "openai:qwen2.5-0.5b-instruct"}


def test_unpriced_local_model_is_refused_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_PRICES_FILE", raising=False)
    with pytest.raises(PricingError) as info:
        check_model_config(LOCAL)
    msg = str(info.value)
    assert "openai:qwen2.5-0.5b-instruct (tier fast) has no price" in msg
    assert "KEEL_PRICES_FILE" in msg and "genai-prices" in msg and "\n" not in msg


def test_a_prices_file_makes_it_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"openai:qwen2.5-0.5b-instruct": {"input": 0, "output": 0}}))
    monkeypatch.setenv("KEEL_PRICES_FILE", str(prices))
    check_model_config(LOCAL)


def test_failover_models_must_be_priced_too() -> None:
    env = {"ANTHROPIC_API_KEY": "k", "OPENAI_BASE_URL": "http://x/v1"}
    assert configured_models(env)["openai:gpt-4o-mini"] == "failover for anthropic:claude-haiku-4-5"


@pytest.mark.parametrize("value", ["5", "0", "many"])
def test_breaker_threshold_must_leave_attempts_to_fail_over(value: str) -> None:
    with pytest.raises(ValueError, match="KEEL_MODEL_BREAKER_THRESHOLD must be an integer from 1 to 4"):
        check_model_config({"KEEL_MODEL_BREAKER_THRESHOLD": value})


def test_bad_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="KEEL_MODEL_TIMEOUT_S"):
        check_model_config({"KEEL_MODEL_TIMEOUT_S": "-1"})


def test_worker_process_exits_with_one_line(tmp_path: Path) -> None:
    settings = load_settings({"KEEL_STATE_DIR": str(tmp_path), "KEEL_PG_PORT": "9"})
    env = offline_env(settings, **LOCAL)
    env.pop("KEEL_PRICES_FILE", None)
    done = subprocess.run(
        [sys.executable, "worker.py"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("worker: PricingError: openai:qwen2.5-0.5b-instruct (tier fast) has no price")
