"""The provider layer through the real OpenAI and Anthropic SDKs, against local fakes."""

from __future__ import annotations

import dataclasses
import email.utils
import time
from datetime import timedelta

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

import keel.activities.llm as llm
import keel.activities.models as models
import keel.pricing as pricing
import keel.tiers as tiers
from keel.activities.models import (
    ModelProvider,
    anthropic_provider,
    errors,
    openai_provider,
)
from keel.activities.models.anthropic_provider import AnthropicProvider
from keel.activities.models.errors import translate_provider_error
from keel.activities.models.openai_provider import OpenAIProvider
from keel.activities.models.providers import get_provider
from keel.models import ChatMessage, ModelCall, Usage
from keel.pricing import cost_micros
from tests.providers import fake_anthropic as fa
from tests.providers import fake_openai as fo
from tests.providers.conftest import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY

PLAN_SCHEMA = {
    "type": "object",
    "properties": {"steps": {"type": "array"}, "answer": {"type": "string"}},
    "required": ["steps", "answer"],
}
GOOD_PLAN = {"steps": [{"id": "s1", "tool": "lookup_order"}], "answer": ""}


def _call(model: str, schema: bool = False) -> ModelCall:
    return ModelCall(
        model=model,
        system="You are a planner.",
        messages=(ChatMessage(role="user", content="Where is order 42?"),),
        output_schema=PLAN_SCHEMA if schema else None,
        schema_name="plan",
        max_tokens=300,
        tools_doc=({"name": "lookup_order", "description": "Find an order"},),
    )


async def _fails(provider: ModelProvider, call: ModelCall) -> ApplicationError:
    with pytest.raises(ApplicationError) as info:
        await provider.complete(call)
    return info.value


# --- dispatch ---------------------------------------------------------------------------


def test_get_provider_dispatches_on_prefix() -> None:
    assert isinstance(get_provider("openai:gpt-4o-mini"), OpenAIProvider)
    assert isinstance(get_provider("anthropic:claude-haiku-4-5"), AnthropicProvider)
    for bad in ("gpt-4o-mini", "mistral:large", "openai:", ""):
        with pytest.raises(ValueError, match="unknown model"):
            get_provider(bad)


def test_get_provider_offline() -> None:
    pytest.importorskip("keel.activities.models.offline")
    assert isinstance(get_provider("offline"), ModelProvider)


def test_public_surface() -> None:
    for module in (models, llm, errors, openai_provider, anthropic_provider, pricing, tiers):
        assert all(hasattr(module, name) for name in module.__all__)


# --- OpenAI -----------------------------------------------------------------------------


async def test_openai_text_usage_and_cost(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.push(
        fo.chat("Order 42 shipped.", prompt_tokens=1200, completion_tokens=40, cached_tokens=1024)
    )
    result = await OpenAIProvider().complete(_call("openai:gpt-4o-mini"))
    assert result.text == "Order 42 shipped." and result.parsed is None
    assert result.usage == Usage(input_tokens=1200, cached_input_tokens=1024, output_tokens=40)
    # 176 plain x 0.15 + 1024 cached x 0.075 + 40 out x 0.60 = 26.4 + 76.8 + 24 -> 128 micros
    assert cost_micros(result.model, result.usage) == 128
    [request] = fake_openai.requests
    assert request.headers["authorization"] == f"Bearer {FAKE_OPENAI_KEY}"
    assert request.body["model"] == "gpt-4o-mini"
    assert request.body["max_tokens"] == 300
    assert "response_format" not in request.body
    system = request.body["messages"][0]
    assert system["role"] == "system" and "lookup_order" in system["content"]


async def test_openai_structured_plan(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.push(fo.chat('{"steps": [{"id": "s1", "tool": "lookup_order"}], "answer": ""}'))
    result = await OpenAIProvider().complete(_call("openai:gpt-4o-mini", schema=True))
    assert result.parsed == GOOD_PLAN
    fmt = fake_openai.requests[0].body["response_format"]
    assert fmt == {
        "type": "json_schema",
        "json_schema": {"name": "plan", "schema": PLAN_SCHEMA, "strict": False},
    }


async def test_openai_json_object_mode(fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_OPENAI_JSON_MODE", "json_object")
    fake_openai.push(fo.chat('```json\n{"steps": [], "answer": "hi"}\n```'))
    result = await OpenAIProvider().complete(_call("openai:llama3.1", schema=True))
    assert result.parsed == {"steps": [], "answer": "hi"}
    body = fake_openai.requests[0].body
    assert body["response_format"] == {"type": "json_object"}
    assert '"required"' in body["messages"][0]["content"]


async def test_openai_429_retry_after_seconds(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.push(
        fo.error(
            429,
            "Rate limit reached",
            type_="requests",
            code="rate_limit_exceeded",
            headers={"retry-after": "7"},
        )
    )
    err = await _fails(OpenAIProvider(), _call("openai:gpt-4o-mini"))
    assert err.type == "ProviderRateLimited" and not err.non_retryable
    assert err.next_retry_delay == timedelta(seconds=7)
    assert len(fake_openai.requests) == 1  # the SDK did not retry on its own


async def test_openai_429_retry_after_http_date(fake_openai: fo.FakeOpenAI) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    fake_openai.push(fo.error(429, "slow down", headers={"retry-after": when}))
    err = await _fails(OpenAIProvider(), _call("openai:gpt-4o-mini"))
    assert err.next_retry_delay is not None
    assert timedelta(seconds=25) <= err.next_retry_delay <= timedelta(seconds=31)


async def test_openai_insufficient_quota_is_not_retried(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.push(fo.error(429, "You exceeded your current quota", code="insufficient_quota"))
    err = await _fails(OpenAIProvider(), _call("openai:gpt-4o-mini"))
    assert err.type == "ProviderQuotaExceeded" and err.non_retryable


async def test_openai_500_is_retryable(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.push(fo.error(500, "The server had an error", type_="server_error"))
    err = await _fails(OpenAIProvider(), _call("openai:gpt-4o-mini"))
    assert err.type == "ProviderUnavailable" and not err.non_retryable
    assert err.next_retry_delay is None
    assert len(fake_openai.requests) == 1


async def test_openai_401_fails_fast_without_leaking_the_key(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.push(fo.error(401, f"Incorrect API key provided: {FAKE_OPENAI_KEY}", code="invalid_api_key"))
    started = time.monotonic()
    err = await _fails(OpenAIProvider(), _call("openai:gpt-4o-mini"))
    assert time.monotonic() - started < 2
    assert err.type == "ProviderAuthError" and err.non_retryable
    assert str(err.message) == "openai: authentication failed (401) — check OPENAI_API_KEY"
    assert FAKE_OPENAI_KEY not in str(err)
    assert len(fake_openai.requests) == 1


async def test_openai_400_is_a_bad_request(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.push(fo.error(400, "Invalid schema for response_format 'plan'"))
    err = await _fails(OpenAIProvider(), _call("openai:gpt-4o-mini", schema=True))
    assert err.type == "ProviderBadRequest" and err.non_retryable
    assert "Invalid schema" in err.message


async def test_openai_malformed_json_is_reported_not_repaired(fake_openai: fo.FakeOpenAI) -> None:
    """One complete() is one request: the caller (activities.metered) decides on a repair,
    after holding budget for it."""
    fake_openai.push(fo.chat('{"steps": [', prompt_tokens=100, completion_tokens=5))
    result = await OpenAIProvider().complete(_call("openai:gpt-4o-mini", schema=True))
    assert result.parsed is None and "invalid JSON" in result.parse_error
    assert result.usage == Usage(input_tokens=100, output_tokens=5) and result.usage_known
    assert len(fake_openai.requests) == 1


async def test_openai_json_in_prose_or_a_fence_anywhere_is_found(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.push(
        fo.chat('Sure! Here is the plan:\n```json\n{"steps": [], "answer": "hi"}\n```\nAnything else?'),
        fo.chat('I think {"steps": [], "answer": "yo"} is right.'),
    )
    first = await OpenAIProvider().complete(_call("openai:gpt-4o-mini", schema=True))
    second = await OpenAIProvider().complete(_call("openai:gpt-4o-mini", schema=True))
    assert first.parsed == {"steps": [], "answer": "hi"}
    assert second.parsed == {"steps": [], "answer": "yo"}


async def test_openai_length_is_truncated_and_missing_usage_is_unknown(fake_openai: fo.FakeOpenAI) -> None:
    cut = fo.chat('{"steps": [{"id": "s1", "tool": "look', finish_reason="length")
    no_usage = fo.chat('{"steps": [], "answer": "x"}')
    assert isinstance(no_usage.body, dict)
    no_usage.body.pop("usage")
    fake_openai.push(cut, no_usage)
    result = await OpenAIProvider().complete(_call("openai:gpt-4o-mini", schema=True))
    assert result.truncated and result.parsed is None
    result = await OpenAIProvider().complete(_call("openai:gpt-4o-mini", schema=True))
    assert not result.usage_known and result.parsed == {"steps": [], "answer": "x"}


async def test_request_timeout_comes_from_config(
    fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_MODEL_TIMEOUT_S", "0.3")
    fake_openai.push(dataclasses.replace(fo.chat("late"), delay_s=1.5))
    started = time.monotonic()
    err = await _fails(OpenAIProvider(), _call("openai:gpt-4o-mini"))
    assert err.type == "ProviderTimeout" and not err.non_retryable
    assert time.monotonic() - started < 1.4
    monkeypatch.setenv("KEEL_MODEL_TIMEOUT_S", "soon")
    err = await _fails(OpenAIProvider(), _call("openai:gpt-4o-mini"))
    assert err.non_retryable and "KEEL_MODEL_TIMEOUT_S must be a positive number" in err.message


async def test_openai_content_filter_is_a_refusal(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.push(fo.chat(None, refusal="I can't help with that."))
    err = await _fails(OpenAIProvider(), _call("openai:gpt-4o-mini", schema=True))
    assert err.type == "ProviderRefusal" and err.non_retryable


async def test_openai_unreachable_is_retryable(
    fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = fo.FakeOpenAI()  # bound but never serving, then closed: connection refused
    dead.stop()
    monkeypatch.setenv("OPENAI_BASE_URL", dead.url + "/v1")
    err = await _fails(OpenAIProvider(), _call("openai:gpt-4o-mini"))
    assert err.type in ("ProviderUnavailable", "ProviderTimeout") and not err.non_retryable


async def test_openai_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    err = await _fails(OpenAIProvider(), _call("openai:gpt-4o-mini"))
    assert err.type == "ProviderAuthError" and err.non_retryable
    assert "OPENAI_API_KEY" in err.message


# --- Anthropic --------------------------------------------------------------------------


async def test_anthropic_text_usage_normalised(fake_anthropic: fa.FakeAnthropic) -> None:
    fake_anthropic.push(
        fa.text("Order 42 shipped.", input_tokens=50, output_tokens=30, cache_read=2000, cache_write=100)
    )
    result = await AnthropicProvider().complete(_call("anthropic:claude-haiku-4-5"))
    assert result.text == "Order 42 shipped." and result.provider == "anthropic"
    assert result.usage == Usage(
        input_tokens=2150, cached_input_tokens=2000, cache_write_tokens=100, output_tokens=30
    )
    # 50 x $1 + 2000 x $0.10 + 100 x $1.25 + 30 x $5 per Mtok = 50 + 200 + 125 + 150 micros
    assert cost_micros(result.model, result.usage) == 525
    [request] = fake_anthropic.requests
    # Older SDKs send x-api-key, newer ones a bearer token: either way the key is the env's.
    auth = request.headers.get("x-api-key") or request.headers["authorization"]
    assert auth.removeprefix("Bearer ") == FAKE_ANTHROPIC_KEY
    assert request.body["model"] == "claude-haiku-4-5"
    assert request.body["max_tokens"] == 300
    [system] = request.body["system"]
    assert system["cache_control"] == {"type": "ephemeral"}
    assert "lookup_order" in system["text"]
    assert "tools" not in request.body


async def test_anthropic_structured_via_forced_tool(fake_anthropic: fa.FakeAnthropic) -> None:
    fake_anthropic.push(fa.tool_use("plan", GOOD_PLAN))
    result = await AnthropicProvider().complete(_call("anthropic:claude-haiku-4-5", schema=True))
    assert result.parsed == GOOD_PLAN
    body = fake_anthropic.requests[0].body
    [tool] = body["tools"]
    assert tool["name"] == "plan" and tool["input_schema"] == PLAN_SCHEMA
    assert tool["cache_control"] == {"type": "ephemeral"}
    assert body["tool_choice"] == {"type": "tool", "name": "plan"}


async def test_anthropic_429_retry_after_ms(fake_anthropic: fa.FakeAnthropic) -> None:
    fake_anthropic.push(
        fa.error(
            429,
            "rate_limit_error",
            "Number of requests exceeded",
            headers={"retry-after-ms": "1500", "retry-after": "2"},
        )
    )
    err = await _fails(AnthropicProvider(), _call("anthropic:claude-haiku-4-5"))
    assert err.type == "ProviderRateLimited" and not err.non_retryable
    assert err.next_retry_delay == timedelta(seconds=1.5)
    assert len(fake_anthropic.requests) == 1


async def test_anthropic_overloaded_is_retryable(fake_anthropic: fa.FakeAnthropic) -> None:
    fake_anthropic.push(fa.error(529, "overloaded_error", "Overloaded"))
    err = await _fails(AnthropicProvider(), _call("anthropic:claude-haiku-4-5"))
    assert err.type == "ProviderUnavailable" and not err.non_retryable
    assert len(fake_anthropic.requests) == 1


async def test_anthropic_401_fails_fast(fake_anthropic: fa.FakeAnthropic) -> None:
    fake_anthropic.push(fa.error(401, "authentication_error", "invalid x-api-key"))
    err = await _fails(AnthropicProvider(), _call("anthropic:claude-haiku-4-5"))
    assert err.type == "ProviderAuthError" and err.non_retryable
    assert "ANTHROPIC_API_KEY" in err.message and FAKE_ANTHROPIC_KEY not in str(err)
    assert len(fake_anthropic.requests) == 1


async def test_anthropic_text_instead_of_tool_is_searched_for_json(
    fake_anthropic: fa.FakeAnthropic,
) -> None:
    fake_anthropic.push(fa.text("{not json"), fa.text('Plan: {"steps": [], "answer": "hi"}'))
    bad = await AnthropicProvider().complete(_call("anthropic:claude-haiku-4-5", schema=True))
    assert bad.parsed is None and "invalid JSON" in bad.parse_error
    good = await AnthropicProvider().complete(_call("anthropic:claude-haiku-4-5", schema=True))
    assert good.parsed == {"steps": [], "answer": "hi"}
    assert len(fake_anthropic.requests) == 2


async def test_anthropic_invalid_tool_input_and_max_tokens(fake_anthropic: fa.FakeAnthropic) -> None:
    fake_anthropic.push(
        fa.tool_use("plan", {"steps": []}),
        fa.message([{"type": "text", "text": '{"steps": ['}], stop_reason="max_tokens"),
    )
    missing = await AnthropicProvider().complete(_call("anthropic:claude-haiku-4-5", schema=True))
    assert missing.parsed is None and "answer" in missing.parse_error
    assert missing.text == '{"steps": []}'  # what a repair turn shows the model
    cut = await AnthropicProvider().complete(_call("anthropic:claude-haiku-4-5", schema=True))
    assert cut.truncated and "max_tokens" in cut.parse_error


async def test_anthropic_refusal(fake_anthropic: fa.FakeAnthropic) -> None:
    fake_anthropic.push(fa.message([], stop_reason="refusal"))
    err = await _fails(AnthropicProvider(), _call("anthropic:claude-haiku-4-5"))
    assert err.type == "ProviderRefusal" and err.non_retryable


# --- error translation and the activity ---------------------------------------------------


def test_translation_is_idempotent_and_covers_timeouts() -> None:
    original = ApplicationError("x", type="ProviderRateLimited")
    assert translate_provider_error(original) is original
    timeout = translate_provider_error(TimeoutError(), "openai")
    assert isinstance(timeout, ApplicationError) and timeout.type == "ProviderTimeout"
    assert not timeout.non_retryable
    odd = translate_provider_error(KeyError("sk-live-abcdefghijklmnop"), "openai")
    assert isinstance(odd, ApplicationError) and "sk-live" not in odd.message


async def test_call_model_activity_heartbeats_and_measures_latency(
    fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llm, "HEARTBEAT_EVERY_S", 0.05)
    fake_openai.push(dataclasses.replace(fo.chat("ok"), delay_s=0.4))
    env = ActivityEnvironment()
    beats: list[tuple[object, ...]] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    result = await env.run(llm.call_model, _call("openai:gpt-4o-mini"))
    assert result.text == "ok" and result.latency_ms >= 400
    assert len(beats) >= 3


async def test_call_model_activity_errors(fake_openai: fo.FakeOpenAI) -> None:
    env = ActivityEnvironment()
    with pytest.raises(ApplicationError) as info:
        await env.run(llm.call_model, _call("nope:model"))
    assert info.value.non_retryable and info.value.type == "ProviderBadRequest"
    fake_openai.push(fo.error(503, "unavailable", headers={"retry-after": "3"}))
    with pytest.raises(ApplicationError) as info:
        await env.run(llm.call_model, _call("openai:gpt-4o-mini"))
    assert info.value.next_retry_delay == timedelta(seconds=3)
