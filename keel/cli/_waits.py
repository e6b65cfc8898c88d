"""Waiting on a run without hanging silently: no worker, a person to answer, a slow result.

A workflow whose task queue nobody polls waits forever, and so does a status query sent to
it; both look like a hang. Every wait here is bounded by ``NO_WORKER_GRACE`` before it asks
Temporal who polls the queue, and says so in one line when nobody does.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import timedelta
from typing import Any

from keel.cli._output import CliError
from keel.models import RunStatus

__all__ = ["NO_WORKER_GRACE", "await_result", "no_worker", "query_status", "require_worker"]

NO_WORKER_GRACE = 2.0
"""Seconds a command waits for a worker to appear (one may be starting) before it says so."""

QUERY_TIMEOUT = timedelta(seconds=2)
"""A status query gets this long: a live worker answers in milliseconds."""


def no_worker(queue: str) -> str:
    return (
        f"no worker is polling task queue {queue} — start one with 'python worker.py' or 'starter.py dev up'"
    )


async def _pollers(client: Any, namespace: str, queue: str) -> list[str]:
    from keel.doctor import queue_pollers

    try:
        return await queue_pollers(client, namespace, queue, "workflow")
    except Exception:
        return ["?"]  # cannot tell (an old server, no permission): do not claim there is none


async def require_worker(client: Any, namespace: str, queue: str, *, grace: float = NO_WORKER_GRACE) -> None:
    """Return once a worker polls ``queue``; ``CliError`` after ``grace`` seconds of none."""
    deadline = time.monotonic() + grace
    while True:
        if await _pollers(client, namespace, queue):
            return
        if time.monotonic() >= deadline:
            raise CliError(no_worker(queue))
        await asyncio.sleep(0.25)


async def query_status(handle: Any) -> RunStatus | None:
    """The run's status query, or None when no worker answered within ``QUERY_TIMEOUT``."""
    try:
        return await handle.query("status", result_type=RunStatus, rpc_timeout=QUERY_TIMEOUT)  # type: ignore[no-any-return]
    except Exception:
        return None


async def await_result(handle: Any, client: Any, namespace: str, queue: str, *, notices: bool) -> Any:
    """``handle.result()``, telling stderr (with ``notices``) when the run starts waiting for a
    person and how to answer, and when no worker is left to carry it on."""
    result = asyncio.ensure_future(handle.result())
    told_wait, told_worker = "", False
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=NO_WORKER_GRACE)
            if done:
                return result.result()
            if not notices:
                continue
            st = await query_status(handle)
            if st is None:
                if not told_worker and not await _pollers(client, namespace, queue):
                    print(f"warning: {no_worker(queue)}; the run goes on when one starts", file=sys.stderr)
                    told_worker = True
                continue
            told_worker = False
            if st.waiting_for and st.waiting_for != told_wait:
                print(f"waiting: {st.waiting_for}", file=sys.stderr)
                print(
                    f"  answer with: starter.py approve {handle.id}   "
                    f"(or: starter.py approve {handle.id} --reject --reason '...')",
                    file=sys.stderr,
                    flush=True,
                )
            told_wait = st.waiting_for
    finally:
        if not result.done():
            result.cancel()
