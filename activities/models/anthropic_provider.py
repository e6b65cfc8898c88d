"""Anthropic through the official SDK's Messages API.

Structured output is a forced tool call: the schema becomes the tool's ``input_schema`` and
``tool_choice`` names it, so the answer arrives as an already-parsed ``tool_use`` input. The
tool definition and the system prompt carry ``cache_control`` breakpoints: planner calls
repeat the same tool catalogue and instructions, and cached reads cost a tenth of the price.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

from anthropic import AsyncAnthropic
from anthropic.types import Message

from activities.models import add_usage, split_model, system_text, tool_name
from activities.models.errors import (
    check_required,
    invalid_output_error,
    missing_key_error,
    parse_structured,
    refusal_error,
    repair_instruction,
    translate_provider_error,
)
from keel.models import ModelCall, ModelResult, Usage

__all__ = ["REQUEST_TIMEOUT_S", "AnthropicProvider", "close_clients"]

REQUEST_TIMEOUT_S = 120.0
"""Per-request HTTP timeout: shorter than the activity's start-to-close timeout, so a hung
request surfaces as a retryable ``ProviderTimeout`` instead of an opaque activity timeout."""

_EPHEMERAL = {"type": "ephemeral"}
_CLIENTS: dict[tuple[str, str | None], tuple[asyncio.AbstractEventLoop, AsyncAnthropic]] = {}


class AnthropicProvider:
    """:class:`~activities.models.ModelProvider` for ``anthropic:<model>``."""

    async def complete(self, call: ModelCall) -> ModelResult:
        """Run one call, plus at most one repair round if structured output is invalid."""
        _, name = split_model(call.model)
        client = _client()
        kwargs = _request(name, call)
        message = await _create(client, kwargs)
        usage = _usage(message)
        if call.output_schema is None:
            return ModelResult(text=_text(message), usage=usage, model=call.model, provider="anthropic")
        try:
            parsed = _structured(message, call)
        except ValueError as first:
            kwargs["messages"] = [*kwargs["messages"], *_repair_turns(message, str(first))]
            message = await _create(client, kwargs)
            usage = add_usage(usage, _usage(message))
            try:
                parsed = _structured(message, call)
            except ValueError as second:
                raise invalid_output_error("anthropic", str(second), usage) from second
        return ModelResult(
            text=json.dumps(parsed, sort_keys=True),
            parsed=parsed,
            usage=usage,
            model=call.model,
            provider="anthropic",
        )


async def close_clients() -> None:
    """Close and forget every cached client."""
    clients = [client for _, client in _CLIENTS.values()]
    _CLIENTS.clear()
    for client in clients:
        await client.close()


def _client() -> AsyncAnthropic:
    """A client for the current key and base URL, cached because it owns a connection pool.

    A cached client is reused only on the event loop that created it: its pool is bound there.
    """
    key = os.environ.get("ANTHROPIC_API_KEY") or None
    if key is None:
        raise missing_key_error("anthropic")
    base_url = os.environ.get("ANTHROPIC_BASE_URL") or None
    cache_key = (hashlib.sha256(key.encode()).hexdigest(), base_url)
    loop = asyncio.get_running_loop()
    cached = _CLIENTS.get(cache_key)
    if cached is not None and cached[0] is loop:
        return cached[1]
    client = AsyncAnthropic(api_key=key, base_url=base_url, max_retries=0, timeout=REQUEST_TIMEOUT_S)
    _CLIENTS[cache_key] = (loop, client)
    return client


def _request(name: str, call: ModelCall) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": name,
        "max_tokens": call.max_tokens,
        "messages": [{"role": m.role, "content": m.content} for m in call.messages if m.role != "system"],
    }
    system = system_text(call)
    if system:
        kwargs["system"] = [{"type": "text", "text": system, "cache_control": _EPHEMERAL}]
    if call.output_schema is not None:
        tool = tool_name(call)
        kwargs["tools"] = [
            {
                "name": tool,
                "description": "Record the answer. The input must satisfy the schema exactly.",
                "input_schema": call.output_schema,
                "cache_control": _EPHEMERAL,
            }
        ]
        kwargs["tool_choice"] = {"type": "tool", "name": tool}
    return kwargs


async def _create(client: AsyncAnthropic, kwargs: dict[str, Any]) -> Message:
    try:
        message = await client.messages.create(**kwargs)
    except Exception as e:
        raise translate_provider_error(e, "anthropic") from e
    if message.stop_reason == "refusal":
        raise refusal_error("anthropic", _text(message))
    return message


def _text(message: Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def _structured(message: Message, call: ModelCall) -> dict[str, Any]:
    """The forced tool's input; falls back to JSON in text (e.g. a proxy that ignores tools)."""
    schema = call.output_schema or {}
    for block in message.content:
        if block.type == "tool_use" and block.name == tool_name(call):
            return check_required(block.input, schema)
    hint = " (stopped at max_tokens)" if message.stop_reason == "max_tokens" else ""
    try:
        return parse_structured(_text(message), schema)
    except ValueError as e:
        raise ValueError(f"{e}{hint}") from e


def _repair_turns(message: Message, error: str) -> list[dict[str, Any]]:
    """The bad answer echoed back, then the complaint; a tool_use must get a tool_result."""
    for block in message.content:
        if block.type == "tool_use":
            use = {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
            result = {
                "type": "tool_result",
                "tool_use_id": block.id,
                "is_error": True,
                "content": repair_instruction(error),
            }
            return [{"role": "assistant", "content": [use]}, {"role": "user", "content": [result]}]
    return [
        {"role": "assistant", "content": _text(message) or "(empty reply)"},
        {"role": "user", "content": repair_instruction(error)},
    ]


def _usage(message: Message) -> Usage:
    """Normalise: Anthropic's ``input_tokens`` excludes cache reads and writes; ours is total."""
    u = message.usage
    read = u.cache_read_input_tokens or 0
    write = u.cache_creation_input_tokens or 0
    return Usage(
        input_tokens=u.input_tokens + read + write,
        cached_input_tokens=read,
        cache_write_tokens=write,
        output_tokens=u.output_tokens,
    )
