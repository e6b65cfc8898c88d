"""A fake Anthropic Messages endpoint speaking the real wire format."""

from __future__ import annotations

from typing import Any

from tests.providers.fake_http import FakeServer, Scripted

__all__ = ["FakeAnthropic", "error", "message", "text", "tool_use"]


class FakeAnthropic(FakeServer):
    """Serves ``POST /v1/messages``; point ``ANTHROPIC_BASE_URL`` at ``url``."""

    path = "/v1/messages"


def message(
    content: list[dict[str, Any]],
    *,
    input_tokens: int = 100,
    output_tokens: int = 20,
    cache_read: int = 0,
    cache_write: int = 0,
    stop_reason: str = "end_turn",
    model: str = "claude-haiku-4-5-20251001",
) -> Scripted:
    """A ``message`` object; ``input_tokens`` excludes cache reads and writes, as upstream."""
    return Scripted(
        200,
        {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cache_read_input_tokens": cache_read,
                "cache_creation_input_tokens": cache_write,
            },
        },
    )


def text(value: str, **usage: Any) -> Scripted:
    return message([{"type": "text", "text": value}], **usage)


def tool_use(name: str, value: dict[str, Any], **usage: Any) -> Scripted:
    block = {"type": "tool_use", "id": "toolu_fake01", "name": name, "input": value}
    return message([block], stop_reason="tool_use", **usage)


def error(status: int, type_: str, msg: str, *, headers: dict[str, str] | None = None) -> Scripted:
    """An Anthropic error body: ``{"type": "error", "error": {"type", "message"}}``."""
    body = {"type": "error", "error": {"type": type_, "message": msg}}
    return Scripted(status, body, headers or {})
