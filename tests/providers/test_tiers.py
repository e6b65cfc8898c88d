"""Which model each cascade tier means, from the worker's environment."""

from __future__ import annotations

import pytest

from keel.tiers import (
    ANTHROPIC_TIERS,
    OFFLINE_LABEL,
    OPENAI_TIERS,
    TIER_ORDER,
    clamp_tier,
    model_label,
    next_tier,
    resolve_tiers,
)


def test_no_key_means_offline_everywhere() -> None:
    assert resolve_tiers({}) == dict.fromkeys(TIER_ORDER, "offline")
    assert resolve_tiers({"OPENAI_API_KEY": ""}) == dict.fromkeys(TIER_ORDER, "offline")


def test_provider_chosen_from_keys() -> None:
    assert resolve_tiers({"OPENAI_API_KEY": "k"}) == OPENAI_TIERS
    assert resolve_tiers({"OPENAI_BASE_URL": "http://localhost:11434/v1"}) == OPENAI_TIERS
    both = {"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"}
    assert resolve_tiers(both) == ANTHROPIC_TIERS
    assert list(resolve_tiers(both)) == list(TIER_ORDER)


def test_per_tier_overrides() -> None:
    env = {"OPENAI_API_KEY": "k", "KEEL_MODEL_POWERFUL": "openai:o3", "KEEL_MODEL_FAST": "offline"}
    assert resolve_tiers(env) == {**OPENAI_TIERS, "fast": "offline", "powerful": "openai:o3"}
    with pytest.raises(ValueError, match="KEEL_MODEL_BALANCED='gpt-4o'"):
        resolve_tiers({"KEEL_MODEL_BALANCED": "gpt-4o"})


def test_next_and_clamp() -> None:
    assert next_tier("fast", "powerful") == "balanced"
    assert next_tier("balanced", "powerful") == "powerful"
    assert next_tier("powerful", "powerful") is None
    assert next_tier("fast", "fast") is None
    assert next_tier("balanced", "fast") is None
    assert clamp_tier("powerful", "balanced") == "balanced"
    assert clamp_tier("fast", "powerful") == "fast"
    with pytest.raises(ValueError, match="unknown tier 'huge'"):
        clamp_tier("huge", "powerful")


def test_model_label_never_hides_offline() -> None:
    assert model_label("offline") == OFFLINE_LABEL == "offline (deterministic, no API key)"
    assert model_label("openai:gpt-4o-mini") == "openai:gpt-4o-mini"
