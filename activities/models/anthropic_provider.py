"""Anthropic through the official SDK's Messages API.

Structured output is a forced tool call: the schema becomes the tool's ``input_schema`` and
``tool_choice`` names it, so the answer arrives as an already-parsed ``tool_use`` input. The
tool definition and the system prompt carry ``cache_control`` breakpoints: planner calls
repeat the same tool catalogue and instructions, and cached reads cost a tenth of the price.

One ``complete`` is exactly one HTTP request: repairs and truncation retries are decided by
the caller (``keel.activities.metered``), which holds budget for each request before it is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

from anthropic import AsyncAnthropic
from anthropic.types import Message
from temporalio.exceptions import ApplicationError

from keel import telemetry
from keel.activities.models import split_model, system_text, tool_name
from keel.activities.models.errors import (
    BAD_REQUEST,
    check_required,
    missing_key_error,
    model_timeout_s,
    parse_structured,
    refusal_error,
    translate_provider_error,
)
from keel.models import ModelCall, ModelResult, Usage

__all__ = ["AnthropicProvider", "close_clients"]

_EPHEMERAL = {"type": "ephemeral"}
_CLIENTS: dict[tuple[str, str | None], tuple[asyncio.AbstractEventLoop, AsyncAnthropic]] = {}


class AnthropicProvider:
    """:class:`~keel.activities.models.ModelProvider` for ``anthropic:<model>``."""

    async def complete(self, call: ModelCall) -> ModelResult:
        """Send one request; structured output is parsed, or ``parse_error`` says why not.

        A repair (decided by the caller) arrives as ordinary assistant/user text turns: the
        previous answer as JSON text, then the complaint, which the Messages API accepts
        whatever the forced tool.
        """
        _, name = split_model(call.model)
        client = _client()
        message = await _create(client, _request(name, call))
        usage = _usage(message)
        truncated = message.stop_reason == "max_tokens"
        base = {"usage": usage, "model": call.model, "provider": "anthropic", "truncated": truncated}
        if call.output_schema is None:
            return ModelResult(text=_text(message), **base)
        raw, tool_input = _structured(message, call)
        try:
            parsed = (
                check_required(tool_input, call.output_schema)
                if tool_input is not None
                else parse_structured(raw, call.output_schema)
            )
        except ValueError as e:
            hint = " (stopped at max_tokens)" if truncated else ""
            return ModelResult(text=raw, parse_error=f"{e}{hint}", **base)
        return ModelResult(text=json.dumps(parsed, sort_keys=True), parsed=parsed, **base)


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
    # The timeout is set per request (KEEL_MODEL_TIMEOUT_S), so a changed value needs no client.
    client = AsyncAnthropic(api_key=key, base_url=base_url, max_retries=0)
    _CLIENTS[cache_key] = (loop, client)
    return client


def _request(name: str, call: ModelCall) -> dict[str, Any]:
    try:
        timeout = model_timeout_s()
    except ValueError as e:
        raise ApplicationError(f"anthropic: {e}", type=BAD_REQUEST, non_retryable=True) from e
    kwargs: dict[str, Any] = {
        "model": name,
        "max_tokens": call.max_tokens,
        "messages": [{"role": m.role, "content": m.content} for m in call.messages if m.role != "system"],
        "timeout": timeout,
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
    telemetry.model_response(
        model=message.model, response_id=message.id, finish_reasons=[message.stop_reason or ""]
    )
    if message.stop_reason == "refusal":
        raise refusal_error("anthropic", _text(message), _usage(message))
    return message


def _text(message: Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def _structured(message: Message, call: ModelCall) -> tuple[str, Any]:
    """The forced tool's input (and its JSON text), or the text reply when there is none
    (e.g. a proxy that ignores tools), to be searched for JSON."""
    for block in message.content:
        if block.type == "tool_use" and block.name == tool_name(call):
            return json.dumps(block.input, sort_keys=True, default=str), block.input
    return _text(message), None


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
