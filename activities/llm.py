"""The ``call_model`` activity: one model call, heartbeating, with translated errors.

All model I/O happens here so the workflow only ever sees ``ModelResult`` payloads or
``ApplicationError`` failures whose ``non_retryable`` / ``next_retry_delay`` are already right
for its retry policy. API keys come from this worker's environment, never from the payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.models import get_provider, split_model
from activities.models.errors import BAD_REQUEST, translate_provider_error
from keel.models import ModelCall, ModelResult

__all__ = ["HEARTBEAT_EVERY_S", "call_model"]

HEARTBEAT_EVERY_S = 5.0
"""Heartbeat period while a provider call is in flight: well under any sensible heartbeat
timeout (set it to ~15-30 s), so a dead worker is noticed quickly and cancellation arrives."""


@activity.defn(name="call_model")
async def call_model(call: ModelCall) -> ModelResult:
    """Run ``call`` on the provider its ``model`` names and return the result with latency.

    Raises:
        ApplicationError: for every failure; unknown models and bad credentials are
            non-retryable, rate limits and outages retryable (see ``activities.models.errors``).
    """
    try:
        provider_name, _ = split_model(call.model)
        provider = get_provider(call.model)
    except ValueError as e:
        raise ApplicationError(str(e), type=BAD_REQUEST, non_retryable=True) from e
    started = time.monotonic()
    beat = asyncio.create_task(_heartbeat_forever())
    try:
        result = await provider.complete(call)
    except ApplicationError:
        raise
    except Exception as e:
        raise translate_provider_error(e, provider_name) from e
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
    latency_ms = round((time.monotonic() - started) * 1000, 1)
    activity.logger.info(
        "model call %s: %d in (%d cached) / %d out tokens in %.0f ms",
        call.model,
        result.usage.input_tokens,
        result.usage.cached_input_tokens,
        result.usage.output_tokens,
        latency_ms,
    )
    return result.model_copy(update={"latency_ms": latency_ms, "model": result.model or call.model})


async def _heartbeat_forever() -> None:
    """Heartbeat until cancelled; the provider call may take longer than a heartbeat timeout."""
    while True:
        activity.heartbeat()
        await asyncio.sleep(HEARTBEAT_EVERY_S)
