"""Cascade tiers: which model serves ``fast``, ``balanced`` and ``powerful`` on this worker.

The workflow reasons in tiers (start cheap, escalate on a low evaluation score, never above
the policy's or the budget's ``max_tier``); the worker's environment decides which model a
tier means, from whichever API key it holds. With no key every tier is the deterministic
``offline`` model, so Keel runs end to end on a laptop with no network.

Everything here is pure (the environment is passed in), so workflow code may import it.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "ANTHROPIC_TIERS",
    "OFFLINE_LABEL",
    "OPENAI_TIERS",
    "TIER_ORDER",
    "clamp_tier",
    "model_label",
    "next_tier",
    "resolve_tiers",
    "tier_index",
]

TIER_ORDER: tuple[str, ...] = ("fast", "balanced", "powerful")
"""Tiers from cheapest to strongest; escalation moves right."""

ANTHROPIC_TIERS: dict[str, str] = {
    "fast": "anthropic:claude-haiku-4-5",
    "balanced": "anthropic:claude-sonnet-4-5",
    "powerful": "anthropic:claude-opus-4-1",
}
OPENAI_TIERS: dict[str, str] = {
    "fast": "openai:gpt-4o-mini",
    "balanced": "openai:gpt-4.1-mini",
    "powerful": "openai:gpt-4.1",
}
OFFLINE_LABEL = "offline (deterministic, no API key)"

_OVERRIDE_ENV = {tier: f"KEEL_MODEL_{tier.upper()}" for tier in TIER_ORDER}
_PROVIDERS = ("openai", "anthropic")


def resolve_tiers(env: Mapping[str, str]) -> dict[str, str]:
    """Map each tier to a model for a worker with environment ``env``.

    Anthropic wins if ``ANTHROPIC_API_KEY`` is set, then OpenAI if ``OPENAI_API_KEY`` or
    ``OPENAI_BASE_URL`` is (a local compatible server needs no key), else ``offline``.
    ``KEEL_MODEL_FAST`` / ``_BALANCED`` / ``_POWERFUL`` override single tiers.

    Raises:
        ValueError: if an override is not ``offline`` or ``openai:/anthropic:<name>``.
    """
    if env.get("ANTHROPIC_API_KEY"):
        tiers = dict(ANTHROPIC_TIERS)
    elif env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL"):
        tiers = dict(OPENAI_TIERS)
    else:
        tiers = dict.fromkeys(TIER_ORDER, "offline")
    for tier, name in _OVERRIDE_ENV.items():
        override = (env.get(name) or "").strip()
        if override:
            tiers[tier] = _checked(name, override)
    return tiers


def tier_index(tier: str) -> int:
    """Position of ``tier`` in :data:`TIER_ORDER`.

    Raises:
        ValueError: for an unknown tier name.
    """
    try:
        return TIER_ORDER.index(tier)
    except ValueError:
        raise ValueError(f"unknown tier {tier!r}: expected one of {', '.join(TIER_ORDER)}") from None


def next_tier(tier: str, max_tier: str) -> str | None:
    """The tier to escalate to from ``tier``, or ``None`` if that would pass ``max_tier``."""
    following = tier_index(tier) + 1
    if following >= len(TIER_ORDER) or following > tier_index(max_tier):
        return None
    return TIER_ORDER[following]


def clamp_tier(tier: str, max_tier: str) -> str:
    """``tier``, lowered to ``max_tier`` if it is above it (budget caps and policy limits)."""
    return TIER_ORDER[min(tier_index(tier), tier_index(max_tier))]


def model_label(model: str) -> str:
    """Human label for a model, so output never hides that the offline model answered."""
    if model.split(":", 1)[0] == "offline":
        return OFFLINE_LABEL
    return model


def _checked(env_name: str, model: str) -> str:
    provider, sep, name = model.partition(":")
    if model == "offline" or (sep and name and provider in _PROVIDERS):
        return model
    raise ValueError(f"{env_name}={model!r}: expected 'offline', 'openai:<name>' or 'anthropic:<name>'")
