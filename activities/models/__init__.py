"""Model providers behind one small interface.

``ModelCall.model`` names the provider and the model (``openai:gpt-4o-mini``,
``anthropic:claude-haiku-4-5``, ``offline``). This package is the interface and the helpers every
provider shares; the providers import it, it imports none of them (``providers.get_provider``
picks one), so the package and its providers form no import cycle.

:func:`serve_provider` is the seam for another implementation of a prefix: inside its
``with`` block (and in every task started from it, such as a worker's activities) models of
that prefix are served by the given provider. Tests use it to script the model as a function
of the conversation (``tests/doubles/models.py``) while the real activities, metering and
ledger run around it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
from collections.abc import Iterator, Mapping
from typing import Protocol, runtime_checkable

from keel.models import ModelCall, ModelResult, Usage

__all__ = [
    "PROVIDERS",
    "ModelProvider",
    "add_usage",
    "close_clients",
    "serve_provider",
    "served_provider",
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
    One served in the offline model's place may set ``in_process = True`` when it answers at
    once without I/O: a run whose models are all offline then plans first in a local activity
    (``AgentActivities.plans_in_process``).
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


_SERVED: contextvars.ContextVar[Mapping[str, ModelProvider] | None] = contextvars.ContextVar(
    "keel_served_providers", default=None
)
"""Providers :func:`serve_provider` put in place, by prefix (a context variable, so a worker
started inside the block sees them and another worker of the same process does not)."""


@contextlib.contextmanager
def serve_provider(prefix: str, provider: ModelProvider) -> Iterator[None]:
    """Serve the models of ``prefix`` (one of :data:`PROVIDERS`) with ``provider`` in this block.

    Only the implementation changes: model names, prices, tiers, breakers and the ledger's
    metering stay those of ``prefix``.

    Raises:
        ValueError: if ``prefix`` is not one of :data:`PROVIDERS`.
    """
    if prefix not in PROVIDERS:
        raise ValueError(f"unknown provider {prefix!r}: expected one of {', '.join(PROVIDERS)}")
    before = _SERVED.get()
    _SERVED.set({**(before or {}), prefix: provider})
    try:
        yield
    finally:  # set, not reset: an async fixture may end in another context than it began
        _SERVED.set(before)


def served_provider(prefix: str) -> ModelProvider | None:
    """The provider :func:`serve_provider` put in place for ``prefix`` in this context, if any
    (``providers.get_provider`` asks first)."""
    return (_SERVED.get() or {}).get(prefix)


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
