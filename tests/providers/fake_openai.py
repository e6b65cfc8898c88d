"""A fake OpenAI Chat Completions endpoint speaking the real wire format."""

from __future__ import annotations

from typing import Any

from tests.providers.fake_http import FakeServer, Scripted

__all__ = ["FakeOpenAI", "chat", "error"]


class FakeOpenAI(FakeServer):
    """Serves ``POST /v1/chat/completions``; point ``OPENAI_BASE_URL`` at ``url + "/v1"``."""

    path = "/v1/chat/completions"


def chat(
    content: str | None,
    *,
    prompt_tokens: int = 100,
    completion_tokens: int = 20,
    cached_tokens: int = 0,
    finish_reason: str = "stop",
    refusal: str | None = None,
    model: str = "gpt-4o-mini-2024-07-18",
) -> Scripted:
    """A ``chat.completion`` object with usage, including cached prompt tokens."""
    return Scripted(
        200,
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": refusal},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        },
    )


def error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Scripted:
    """An OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
    body: dict[str, Any] = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return Scripted(status, body, headers or {})
