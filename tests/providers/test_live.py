"""Opt-in calls to the real APIs: skipped unless the matching key is in the environment."""

from __future__ import annotations

import os

import pytest

from keel.activities.models.providers import get_provider
from keel.models import ChatMessage, ModelCall
from keel.pricing import cost_micros

_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}


@pytest.mark.parametrize(
    ("model", "key"),
    [("openai:gpt-4o-mini", "OPENAI_API_KEY"), ("anthropic:claude-haiku-4-5", "ANTHROPIC_API_KEY")],
)
async def test_live_structured_call(model: str, key: str) -> None:
    if not os.environ.get(key):
        pytest.skip(f"{key} not set: live provider test is opt-in")
    if key == "OPENAI_API_KEY" and os.environ.get("OPENAI_BASE_URL"):
        pytest.skip("OPENAI_BASE_URL points elsewhere; gpt-4o-mini may not be served there")
    call = ModelCall(
        model=model,
        system="Answer with the requested JSON only.",
        messages=(ChatMessage(role="user", content="What is the capital of France?"),),
        output_schema=_SCHEMA,
        schema_name="answer",
        max_tokens=100,
    )
    result = await get_provider(model).complete(call)
    assert result.parsed is not None and "paris" in str(result.parsed["city"]).lower()
    assert result.usage.input_tokens > 0 and cost_micros(model, result.usage) > 0
