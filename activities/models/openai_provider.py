"""OpenAI (and any OpenAI-compatible server) through the official SDK's Chat Completions API.

Chat Completions rather than Responses because vLLM, Ollama and llama.cpp speak it too:
point ``OPENAI_BASE_URL`` at them and nothing else changes. Structured output uses
``response_format=json_schema`` (non-strict, so ordinary pydantic schemas are accepted);
servers without it can be switched to plain JSON mode with ``KEEL_OPENAI_JSON_MODE=json_object``.

One ``complete`` is exactly one HTTP request: repairs and truncation retries are decided by
the caller (``keel.activities.metered``), which holds budget for each request before it is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion
from temporalio.exceptions import ApplicationError

from keel import telemetry
from keel.activities.models import split_model, system_text, tool_name
from keel.activities.models.errors import (
    BAD_REQUEST,
    missing_key_error,
    model_timeout_s,
    parse_structured,
    refusal_error,
    translate_provider_error,
)
from keel.models import ModelCall, ModelResult, Usage

__all__ = ["OpenAIProvider", "close_clients"]

_JSON_MODES = ("json_schema", "json_object")
_CLIENTS: dict[tuple[str, str | None], tuple[asyncio.AbstractEventLoop, AsyncOpenAI]] = {}


class OpenAIProvider:
    """:class:`~keel.activities.models.ModelProvider` for ``openai:<model>``."""

    async def complete(self, call: ModelCall) -> ModelResult:
        """Send one request; structured output is parsed, or ``parse_error`` says why not."""
        _, name = split_model(call.model)
        client, compatible = _client()
        completion = await _create(client, name, call, _messages(call), compatible)
        telemetry.model_response(
            model=completion.model or "",
            response_id=completion.id or "",
            finish_reasons=[c.finish_reason or "" for c in completion.choices],
        )
        usage, known = _usage(completion)
        text = _text(completion, usage)
        truncated = bool(completion.choices) and completion.choices[0].finish_reason == "length"
        base = {"usage": usage, "usage_known": known, "model": call.model, "provider": "openai"}
        if call.output_schema is None:
            return ModelResult(text=text, truncated=truncated, **base)
        try:
            parsed = parse_structured(text, call.output_schema)
        except ValueError as e:
            return ModelResult(text=text, parse_error=str(e), truncated=truncated, **base)
        return ModelResult(text=text, parsed=parsed, truncated=truncated, **base)


async def close_clients() -> None:
    """Close and forget every cached client."""
    clients = [client for _, client in _CLIENTS.values()]
    _CLIENTS.clear()
    for client in clients:
        await client.close()


def _client() -> tuple[AsyncOpenAI, bool]:
    """A client for the current key and base URL, cached because it owns a connection pool.

    Returns the client and whether it talks to a compatible server (``OPENAI_BASE_URL`` set).
    A cached client is reused only on the event loop that created it: its pool is bound there.
    """
    key = os.environ.get("OPENAI_API_KEY") or None
    base_url = os.environ.get("OPENAI_BASE_URL") or None
    if key is None and base_url is None:
        raise missing_key_error("openai")
    cache_key = (hashlib.sha256((key or "").encode()).hexdigest(), base_url)
    loop = asyncio.get_running_loop()
    cached = _CLIENTS.get(cache_key)
    if cached is not None and cached[0] is loop:
        return cached[1], base_url is not None
    options: dict[str, Any] = {"base_url": base_url} if base_url else {}
    # Local servers often need no key, but the SDK insists on one. The timeout is set per
    # request (KEEL_MODEL_TIMEOUT_S), so a changed value needs no new client.
    client = AsyncOpenAI(api_key=key or "not-needed", max_retries=0, **options)
    _CLIENTS[cache_key] = (loop, client)
    return client, base_url is not None


def _json_mode() -> str:
    mode = os.environ.get("KEEL_OPENAI_JSON_MODE") or "json_schema"
    if mode not in _JSON_MODES:
        raise ApplicationError(
            f"openai: KEEL_OPENAI_JSON_MODE must be one of {', '.join(_JSON_MODES)}, got {mode!r}",
            type=BAD_REQUEST,
            non_retryable=True,
        )
    return mode


def _messages(call: ModelCall) -> list[dict[str, Any]]:
    system = system_text(call)
    if call.output_schema is not None and _json_mode() == "json_object":
        # JSON mode constrains syntax only, and requires the word "JSON" in the prompt.
        schema = json.dumps(call.output_schema, sort_keys=True)
        system = f"{system}\n\nReply with one JSON object matching this JSON schema:\n{schema}"
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages += [{"role": m.role, "content": m.content} for m in call.messages if m.role != "system"]
    return messages


async def _create(
    client: AsyncOpenAI,
    name: str,
    call: ModelCall,
    messages: list[dict[str, Any]],
    compatible: bool,
) -> ChatCompletion:
    try:
        timeout = model_timeout_s()
    except ValueError as e:
        raise ApplicationError(f"openai: {e}", type=BAD_REQUEST, non_retryable=True) from e
    kwargs: dict[str, Any] = {"model": name, "messages": messages, "timeout": timeout}
    # OpenAI's reasoning models accept only max_completion_tokens; compatible servers
    # universally understand max_tokens.
    kwargs["max_tokens" if compatible else "max_completion_tokens"] = call.max_tokens
    if call.output_schema is not None:
        if _json_mode() == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        else:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": tool_name(call),
                    "schema": call.output_schema,
                    "strict": False,
                },
            }
    try:
        return await client.chat.completions.create(**kwargs)
    except Exception as e:
        raise translate_provider_error(e, "openai") from e


def _text(completion: ChatCompletion, usage: Usage) -> str:
    if not completion.choices:
        return ""
    choice = completion.choices[0]
    if choice.finish_reason == "content_filter":
        raise refusal_error("openai", "content filter", usage)
    if choice.message.refusal:
        raise refusal_error("openai", choice.message.refusal, usage)
    return choice.message.content or ""


def _usage(completion: ChatCompletion) -> tuple[Usage, bool]:
    """The reported usage, and whether there was one (some compatible servers omit it)."""
    u = completion.usage
    if u is None:
        return Usage(), False
    details = u.prompt_tokens_details
    return (
        Usage(
            input_tokens=u.prompt_tokens,
            cached_input_tokens=(details.cached_tokens or 0) if details else 0,
            output_tokens=u.completion_tokens,
        ),
        True,
    )
