"""Cancellation: why a run must stop, where it may stop, and which awaits a stop interrupts.

Three things can stop a run: the ``cancel`` update, the deadline timer and a Temporal
cancel. Each only *records* a reason (the first wins) and cancels the one long activity in
flight; the loop notices at its next safe point (``check``). Control-plane calls, the saga
and the final answer are awaited ``shielded`` so a stop can never leave a reservation, an
audit row or an undo half done.
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, FailureError, is_cancelled_exception

__all__ = ["CANCEL_AT_SAFE_POINTS_PATCH", "Abort", "Stopper", "as_activity_error", "cause"]

CANCEL_AT_SAFE_POINTS_PATCH = "keel-cancel-at-safe-points"
"""A Temporal cancel that no cancelled await reported is honoured at the next safe point."""


class Abort(Exception):
    """Internal: stop the loop with an outcome and a reason (never leaves the workflow)."""

    def __init__(self, outcome: str, reason: str, flag: str = "") -> None:
        super().__init__(reason)
        self.outcome, self.reason, self.flag = outcome, reason, flag


class Stopper:
    """The run's stop request and the long activity a stop interrupts."""

    def __init__(self) -> None:
        self.stop: Abort | None = None
        """Why the run must stop: ``cancel`` update, deadline or Temporal cancel."""
        self._inflight: asyncio.Task[Any] | None = None
        """The long activity (plan, evaluate, tool) a stop request cancels."""
        self._cancelling: asyncio.Task[None] | None = None

    def check(self) -> None:
        """A safe point: stop here if a cancel, a deadline or a Temporal cancel arrived.

        A Temporal cancel is also read here, not only from a cancelled await: asyncio drops a
        task's cancellation when the task it awaits absorbs it and returns a result, and an
        activity awaited with ``WAIT_CANCELLATION_COMPLETED`` that finishes anyway (a quick
        tool, a preparation that was shielded) does just that, so the run went on as if never
        cancelled. Runs recorded before ``CANCEL_AT_SAFE_POINTS_PATCH`` replay without it
        (the marker is asked only when a cancel is pending and no stop was recorded)."""
        if (
            self.stop is None
            and workflow.cancellation_reason() is not None
            and workflow.patched(CANCEL_AT_SAFE_POINTS_PATCH)
        ):
            self.note_workflow_cancel()
        if self.stop is not None:
            raise Abort(self.stop.outcome, self.stop.reason, self.stop.flag)

    def request(self, stop: Abort) -> None:
        """Record why the run must stop (the first reason wins) and cancel the long activity.

        The cancel waits one turn of the workflow's event loop: an update can arrive in the
        same activation as the long activity's result (a replay delivers them together where
        the original run saw them apart), and cancelling an activity whose result is already
        there would take another path than the original run did (a nondeterminism error).
        After one turn that activity has finished, and only a still-running one is cancelled.
        """
        if self.stop is None:
            self.stop = stop
        handle = self._inflight
        if handle is not None and not handle.done():
            self._cancelling = asyncio.create_task(_cancel_unfinished(handle))

    def note_workflow_cancel(self) -> None:
        if self.stop is None:
            reason = workflow.cancellation_reason() or "workflow cancelled"
            self.stop = Abort("cancelled", reason, "cancelled")

    def note_cancel(self, e: ActivityError) -> bool:
        """True when ``e`` is a cancellation; one we did not ask for is Temporal's cancel."""
        if not is_cancelled_exception(e):
            return False
        self.note_workflow_cancel()
        return True

    async def interruptible(self, handle: workflow.ActivityHandle[Any]) -> Any:
        """Await a long activity that a stop request may cancel (see ``request``)."""
        self._inflight = handle
        try:
            return await handle
        finally:
            self._inflight = None

    async def shielded(self, handle: workflow.ActivityHandle[Any]) -> Any:
        """Await an activity to its end even if the run is cancelled meanwhile.

        Control-plane calls (ledger, audit), compensations and the final answer must finish:
        cancelling one half-way would leave a reservation or an undo in an unknown state. A
        Temporal cancel that arrives here is remembered and honoured at the next safe point.
        """
        while True:
            try:
                return await asyncio.shield(handle)
            except asyncio.CancelledError:
                if handle.cancelled():
                    raise
                self.note_workflow_cancel()
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()


ACTIVITY_FAILURES = (ActivityError, ApplicationError)
"""What an activity that gave up raises in workflow code. A local activity's failure (the
ledger, audit and settle calls) arrives as the activity's own ``ApplicationError``, not
wrapped in an ``ActivityError``: catching only the latter turned a ledger refusal into an
internal error, and a failed release in the ending into a workflow failure before the
finish row. No workflow code raises ``ApplicationError`` itself inside the run."""


def cause(e: BaseException) -> str:
    """The innermost message of an activity failure, one line."""
    while e.__cause__ is not None:
        e = e.__cause__
    msg = e.message if isinstance(e, ApplicationError) else str(e)
    return (msg or type(e).__name__).splitlines()[0][:300]


def as_activity_error(e: FailureError, activity_type: str) -> ActivityError:
    """A local activity's failure as the ``ActivityError`` an activity's would be.

    A local activity's own error can arrive unwrapped (its ``ApplicationError``, or the
    cancellation itself); the run handles both kinds of step the same way, so it is wrapped
    here with the error as its cause (``cause`` and ``Stopper.note_cancel`` read through it)."""
    if isinstance(e, ActivityError):
        return e
    wrapped = ActivityError(
        f"{activity_type} failed: {e}",
        scheduled_event_id=0,
        started_event_id=0,
        identity="",
        activity_type=activity_type,
        activity_id="",
        retry_state=None,
    )
    wrapped.__cause__ = e
    return wrapped


async def _cancel_unfinished(handle: asyncio.Task[Any]) -> None:
    await asyncio.sleep(0)  # one turn of the loop, no timer: results of this activation land
    if not handle.done():
        handle.cancel()
