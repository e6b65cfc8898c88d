"""Which version of the workflow's code a run follows: one patch marker for a new run.

Every ``workflow.patched(id)`` a run calls for the first time records a marker event, and the
SDK adds a ``TemporalChangeVersion`` search-attribute upsert beside it: two history events per
patch, five patches in every demo run (ten of its events). A run started since
``LEAN_PATCH`` records that one marker only and takes every patch it subsumes as applied
without recording theirs; a run recorded before it (no ``LEAN_PATCH`` marker) asks each patch
as it always did, so its history replays unchanged.

The answer of ``lean()`` is fixed at the run's first workflow task (``AgentWorkflow.run``
asks before anything else): asked later in a replaying run it would be ``True`` as soon as
replay caught up with the history's end.
"""

from __future__ import annotations

from temporalio import workflow

__all__ = ["BEGIN_PATCH", "LEAN_PATCH", "LOCAL_BEGIN_PATCH", "LOCAL_TOOLS_PATCH", "SUBSUMED", "Versions"]

LEAN_PATCH = "keel-23-lean-run"
"""Issue 23: prepare and (without a model call) finish as local activities, the rules'
evaluation in the workflow when the run has no judge, and the patches below implied."""

SUBSUMED = frozenset(
    {
        "model-holds-in-activity",  # planning.HOLDS_PATCH
        "plan-admission",
        "keel-deadline-pauses-for-people",
        "keel-flags-search-attribute",  # agent.FLAGS_PATCH
        "keel-cancel-ends-canceled",
        "keel-17-flow-gate",  # steps.FLOW_PATCH
        "keel-17-approval-audit",  # steps.APPROVAL_AUDIT_PATCH
    }
)
"""Patches every run with ``LEAN_PATCH`` has applied. Never add a patch made after
``LEAN_PATCH`` shipped: runs recorded between the two would then replay it as applied."""


BEGIN_PATCH = "keel-23-begin-run"
"""Issue 23: the run begins with ONE activity, ``begin_run`` (prepare, then the first plan),
instead of the ``prepare_run`` local activity and a ``plan`` activity. Implies ``LEAN_PATCH``
and everything it subsumes: a run started since records this one marker only."""


LOCAL_BEGIN_PATCH = "keel-23-begin-local"
"""Issue 23: the run first asks the ``begin_local`` local activity, which does
``begin_run``'s work in the first workflow task when every model of the run is the built-in
offline one, and otherwise answers ``remote`` at once (the run then schedules ``begin_run``).
Implies ``BEGIN_PATCH``: a run started since records this one marker only."""


LOCAL_TOOLS_PATCH = "keel-23-local-tools"
"""Issue 23: a step whose tool declares itself quick and in-process (``ToolInfo.local``) runs
``run_tool`` as a local activity in the workflow task that decided it, instead of an activity
(three events, a task through the server's queue and a second workflow task). Implies
``LOCAL_BEGIN_PATCH``: a run started since records this one marker only."""


class Versions:
    def __init__(self) -> None:
        self._lean: bool | None = None
        self._begin = False
        self._local = False
        self._tools = False

    def lean(self) -> bool:
        """Whether this run follows the issue-23 shape (asked first at the run's start).

        The newest patch is asked first (``LOCAL_TOOLS_PATCH``, ``LOCAL_BEGIN_PATCH``, then
        ``BEGIN_PATCH``): a new
        run records it and takes the older ones as applied (one marker); a run recorded
        before it has no such marker, so replay answers ``False`` without recording anything
        and the run asks the next older one as it did."""
        if self._lean is None:
            self._tools = workflow.patched(LOCAL_TOOLS_PATCH)
            self._local = self._tools or workflow.patched(LOCAL_BEGIN_PATCH)
            self._begin = self._local or workflow.patched(BEGIN_PATCH)
            self._lean = self._begin or workflow.patched(LEAN_PATCH)
        return self._lean

    def begin(self) -> bool:
        """Whether this run begins with ``begin_run`` (``BEGIN_PATCH``; fixed with ``lean``)."""
        self.lean()
        return self._begin

    def local_begin(self) -> bool:
        """Whether this run asks ``begin_local`` first (``LOCAL_BEGIN_PATCH``; fixed with ``lean``)."""
        self.lean()
        return self._local

    def local_tools(self) -> bool:
        """Whether this run's quick in-process tools run as local activities
        (``LOCAL_TOOLS_PATCH``; fixed with ``lean``)."""
        self.lean()
        return self._tools

    def patched(self, patch_id: str) -> bool:
        """``workflow.patched(patch_id)``, without a marker when the lean run implies it."""
        if patch_id in SUBSUMED and self.lean():
            return True
        return workflow.patched(patch_id)
