"""What ``AgentWorkflow`` imports from Keel, gathered in one module that the sandbox passes
through whole.

Temporal's sandbox re-imports the workflow module for every new run (its state must not
leak between runs), and every module that module imports for the first time in a run costs
a pass-through check and an un-patching of the sandbox's builtins, even when the module
itself is shared: fourteen Keel modules were ~0.3-0.45 ms of the ~2.0 ms CPU each run
spent creating its sandbox. Imported from here, they are one pass-through. What is passed
through is unchanged (these modules were inside ``imports_passed_through`` before, and
stay the only ones): the standard library, ``temporalio`` and ``email_validator`` are still
imported by the workflow module itself, so the sandbox still proxies and checks them.

Nothing here may hold state: like the pure core, it is shared by every run of the worker.
"""

import keel.decisions as d
from keel.agent_io import (
    BeginInput,
    BeginOutput,
    FinishInput,
    FinishOutput,
    PlanOutput,
    PrepareInput,
    RunContext,
)
from keel.errors import INTERNAL_ERROR, INVALID_REQUEST, PREPARE_STAGE
from keel.intent import unaddressed
from keel.models import AgentRequest, AgentResponse, Approval, PlanStep, RunStatus, StepState
from keel.search_attributes import FLAGS, OUTCOME, SPEND, TENANT, USER
from keel.tiers import TIER_ORDER, clamp_tier, next_tier
from keel.workflows.holds import Holds
from keel.workflows.options import (
    CONTROL_RETRY,
    FINISH_LOCAL_TIMEOUT,
    FINISH_RETRY,
    LOCAL_BEGIN_RETRY,
    MODEL_HEARTBEAT,
    MODEL_RETRY,
    MODEL_TIMEOUT,
    PREPARE_TIMEOUT,
    TOOL_HEARTBEAT,
)
from keel.workflows.planning import HOLDS_PATCH, Planner
from keel.workflows.saga import Saga
from keel.workflows.state import RunState
from keel.workflows.steps import StepRunner
from keel.workflows.stop import ACTIVITY_FAILURES, Abort, Stopper, as_activity_error, cause

__all__ = [
    "ACTIVITY_FAILURES",
    "Abort",
    "AgentRequest",
    "AgentResponse",
    "Approval",
    "BeginInput",
    "BeginOutput",
    "CONTROL_RETRY",
    "FINISH_LOCAL_TIMEOUT",
    "FINISH_RETRY",
    "FLAGS",
    "LOCAL_BEGIN_RETRY",
    "FinishInput",
    "PREPARE_STAGE",
    "FinishOutput",
    "HOLDS_PATCH",
    "Holds",
    "INTERNAL_ERROR",
    "INVALID_REQUEST",
    "MODEL_HEARTBEAT",
    "MODEL_RETRY",
    "MODEL_TIMEOUT",
    "OUTCOME",
    "PREPARE_TIMEOUT",
    "PlanOutput",
    "PlanStep",
    "Planner",
    "PrepareInput",
    "RunContext",
    "RunState",
    "RunStatus",
    "SPEND",
    "Saga",
    "StepRunner",
    "StepState",
    "Stopper",
    "TENANT",
    "TIER_ORDER",
    "TOOL_HEARTBEAT",
    "USER",
    "as_activity_error",
    "cause",
    "clamp_tier",
    "d",
    "next_tier",
    "unaddressed",
]
