"""Text that every sink can store: PostgreSQL refuses NUL in ``text`` and ``jsonb``, and JSON
has no lone surrogates. Boundaries refuse such strings; stores scrub what slipped in from
tool or model output (a NUL in a model's answer must not wedge a run's ending)."""

from __future__ import annotations

from typing import Any

__all__ = ["problem", "scrub"]


def problem(value: str) -> str:
    """Why ``value`` cannot be stored as it is, or "" when it can."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 (lone surrogate)"
    return ""


def scrub(value: Any) -> Any:
    """``value`` with NULs removed and lone surrogates replaced, recursively (dicts, lists)."""
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value
