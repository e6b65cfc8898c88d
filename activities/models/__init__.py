"""Model providers behind one small interface.

``ModelCall.model`` names the provider and the model (``openai:gpt-4o-mini``,
``anthropic:claude-haiku-4-5``, ``offline``). This package is the interface and the helpers every
provider shares; the providers import it, it imports none of them (``providers.get_provider``
picks one), so the package and its providers form no import cycle.
"""

from __future__ import annotations

import json
import re
from typing import Protocol, runtime_checkable

from keel.models import ModelCall, ModelResult, Usage

__all__ = [
    "PROVIDERS",
    "ModelProvider",
    "add_usage",
    "close_clients",
    "split_model",
    "system_text",
    "tool_name",
]

PROVIDERS = ("openai", "anthropic", "offline")
"""Provider prefixes :func:`split_model` (and ``providers.get_provider``) understand."""


@runtime_checkable
class ModelProvider(Protocol):
    """Anything that turns one :class:`ModelCall` into one :class:`ModelResult`.

    Implementations raise ``temporalio.exceptions.ApplicationError`` (via
    :mod:`keel.activities.models.errors`) so the activity's retry policy sees the right signal.
    """

    async def complete(self, call: ModelCall) -> ModelResult: ...


def split_model(model: str) -> tuple[str, str]:
    """Split ``provider:name`` into its parts; bare ``offline`` is ``("offline", "offline")``.

    Raises:
        ValueError: for an empty name or a provider not in :data:`PROVIDERS`.
    """
    provider, sep, name = model.partition(":")
    if provider == "offline":
        return "offline", name or "offline"
    if not sep or not name or provider not in PROVIDERS:
        raise ValueError(
            f"unknown model {model!r}: expected 'offline', 'openai:<name>' or 'anthropic:<name>'"
        )
    return provider, name


def system_text(call: ModelCall) -> str:
    """The system prompt sent to a provider: the call's system text plus the tool catalogue.

    The catalogue is rendered as sorted-key JSON so the prefix is byte-identical from call to
    call, which is what lets provider prompt caches hit.
    """
    parts = [call.system.strip()] if call.system.strip() else []
    parts += [m.content for m in call.messages if m.role == "system"]
    if call.tools_doc:
        catalogue = json.dumps(list(call.tools_doc), sort_keys=True, indent=1)
        parts.append(f"Available tools (JSON):\n{catalogue}")
    return "\n\n".join(parts)


def tool_name(call: ModelCall) -> str:
    """``schema_name`` made safe for the providers' ``^[a-zA-Z0-9_-]{1,64}$`` name rule."""
    name = re.sub(r"[^a-zA-Z0-9_-]", "_", call.schema_name)[:64]
    return name or "output"


def add_usage(a: Usage, b: Usage) -> Usage:
    """Sum two usages: a repair round is billed too, so its tokens must reach the ledger."""
    return Usage(
        input_tokens=a.input_tokens + b.input_tokens,
        cached_input_tokens=a.cached_input_tokens + b.cached_input_tokens,
        cache_write_tokens=a.cache_write_tokens + b.cache_write_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
    )


async def close_clients() -> None:
    """Close cached SDK clients (call on worker shutdown; safe if none were created)."""
    import sys

    for module_name in (
        "keel.activities.models.openai_provider",
        "keel.activities.models.anthropic_provider",
    ):
        module = sys.modules.get(module_name)
        if module is not None:
            await module.close_clients()
