"""One heartbeat loop for activities that wait on something slow (a provider, a tool).

The wait may outlast the activity's heartbeat timeout, and a heartbeat is also how an
activity hears that it was cancelled: so the loop runs beside the work, in its own task, and
stops with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from temporalio import activity

__all__ = ["heartbeating"]


@contextlib.asynccontextmanager
async def heartbeating(every_s: float, *, at_once: bool = False) -> AsyncIterator[None]:
    """Heartbeat every ``every_s`` seconds while the block runs; ``at_once`` beats on entry
    too (a model call reports it started; a quick tool should not cost a server call).

    Nothing in a local activity (``begin_local``): it has no heartbeat to send, its liveness
    is its workflow task's."""
    if activity.in_activity() and activity.info().is_local:
        yield
        return

    async def beat() -> None:
        if at_once:
            activity.heartbeat()
        while True:
            await asyncio.sleep(every_s)
            activity.heartbeat()

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
