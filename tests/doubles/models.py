"""A scripted model provider: a Python function writes the model's replies.

Like pydantic-ai's ``FunctionModel``: the function gets what the model would get (the
``ModelCall``: system prompt, messages, tool catalogue) and returns the reply. It plugs into
the real provider seam (``keel.activities.models.serve_provider``) for the ``offline``
prefix, so everything around the reply is production code: the ``plan`` activity builds the
prompt and checks the plan (one repair, then ``InvalidPlan``), ``keel.activities.metered``
holds and commits each call's budget in the ledger at the offline model's nominal price (for
the usage the reply reports), and the workflow sees what it would see from a model.

:class:`ScriptedPlanner` is the common case: iteration ``n`` of a run gets ``plans[n-1]``
(the last repeats), or a function of the conversation picks the plan. Calls of other roles
(a judge, the final answer) are answered by the real offline model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from temporalio import activity

from keel.activities.agent import PLAN_FORMAT, PLANNER_SYSTEM
from keel.activities.models import serve_provider
from keel.activities.models.offline import OfflineModel
from keel.models import ModelCall, ModelResult, Plan, PlanStep, Usage

__all__ = [
    "FunctionModel",
    "PlanCall",
    "ScriptedPlanner",
    "ToolDoc",
    "plan_call",
    "reply",
    "scripted",
    "step",
]

Reply = ModelResult | None
"""What a model function returns: the reply, or ``None`` to let the offline model answer."""


def step(sid: str, tool_name: str, **args: Any) -> PlanStep:
    """A plan step for scripts: ``step("s1", "echo", note="hi")``."""
    return PlanStep(id=sid, tool=tool_name, args=args)


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def reply(call: ModelCall, parsed: dict[str, Any], *, billed: bool = False) -> ModelResult:
    """A structured reply. Its usage is zero tokens unless ``billed`` (then counted as the
    offline model counts, 4 characters a token): either way the call's budget is held and
    committed in the ledger like any model call's, but a scripted plan costs nothing, as the
    spend a test asserts is its tools'."""
    text = json.dumps(parsed, sort_keys=True)
    usage = Usage()
    if billed:
        prompt = call.system + "".join(m.content for m in call.messages) + json.dumps(list(call.tools_doc))
        usage = Usage(input_tokens=_tokens(prompt), output_tokens=min(_tokens(text), call.max_tokens))
    return ModelResult(text=text, parsed=parsed, usage=usage, model=call.model, provider="scripted")


class FunctionModel:
    """A :class:`keel.activities.models.ModelProvider` whose replies ``function`` writes."""

    def __init__(self, function: Callable[[ModelCall], Reply | Awaitable[Reply]]) -> None:
        self._function = function
        self._offline = OfflineModel()

    async def complete(self, call: ModelCall) -> ModelResult:
        out = self._function(call)
        if isinstance(out, Awaitable):
            out = await out
        return out if out is not None else await self._offline.complete(call)

    def serving(self) -> _Serving:
        """Serve the ``offline`` models with this function in a ``with`` or ``async with``
        block (``async with planner.serving(), running_worker(...)``): a worker started
        inside uses it."""
        return _Serving(self)


class _Serving(contextlib.AbstractContextManager[None], contextlib.AbstractAsyncContextManager[None]):
    def __init__(self, model: FunctionModel) -> None:
        self._cm = serve_provider("offline", model)

    def __enter__(self) -> None:
        self._cm.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(None, None, None)

    async def __aenter__(self) -> None:
        self._cm.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self._cm.__exit__(None, None, None)


@dataclass(frozen=True)
class ToolDoc:
    """A tool as the planner's prompt lists it."""

    name: str
    description: str = ""
    args_schema: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanCall:
    """One plan request as the model saw it, read back from the prompt."""

    workflow_id: str
    iteration: int
    """1 for the run's first plan activity, 2 for its second, … (a retry or a repair round
    of the same activity keeps its number)."""
    message: str
    """The request (as the provider sees it: redacted)."""
    instructions: str
    memory: str
    tools: tuple[ToolDoc, ...]
    executed: tuple[dict[str, Any], ...]
    """The ``EXECUTED STEPS`` lines (``tool``, ``state``, ``data``, ``summary``, …)."""
    call: ModelCall


def _section(call: ModelCall, head: str) -> str | None:
    for m in call.messages:
        if m.role == "user" and m.content.startswith(head):
            return m.content[len(head) :]
    return None


def plan_call(call: ModelCall, workflow_id: str = "", iteration: int = 1) -> PlanCall:
    """Read a plan prompt back into its parts (the inverse of ``AgentActivities.plan``)."""
    system = call.system
    instructions = "" if system == PLANNER_SYSTEM else system.removesuffix(PLAN_FORMAT).strip()
    executed: list[dict[str, Any]] = []
    for line in (_section(call, "EXECUTED STEPS") or "").splitlines()[1:]:
        if line.strip().startswith("{"):
            executed.append(json.loads(line))
    memory = (_section(call, "MEMORY") or "").split("\n", 1)[-1] if _section(call, "MEMORY") else ""
    return PlanCall(
        workflow_id=workflow_id,
        iteration=iteration,
        message=(_section(call, "REQUEST: ") or "").strip(),
        instructions=instructions,
        memory=memory,
        tools=tuple(
            ToolDoc(t.get("name", ""), t.get("description", ""), t.get("args_schema") or {})
            for t in call.tools_doc
        ),
        executed=tuple(executed),
        call=call,
    )


class ScriptedPlanner(FunctionModel):
    """A model whose plans a test scripts: iteration ``n`` of a run gets ``plans[n-1]`` (the
    last repeats; none: an empty plan), or ``plans`` is a function of the :class:`PlanCall`.

    ``calls`` lists every plan request in order. Use it around a worker::

        planner = ScriptedPlanner([plan(step("s1", "echo", note="hi"))])
        with planner.serving():
            async with running_worker(...):
                ...
    """

    in_process = True
    """It answers at once, without I/O (``ModelProvider``): runs begin in ``begin_local``."""

    def __init__(
        self, plans: Sequence[Plan] | Callable[[PlanCall], Plan | None], *, billed: bool = False
    ) -> None:
        super().__init__(self._reply)
        self._script = plans
        self._billed = billed
        self.calls: list[PlanCall] = []
        self._iterations: dict[tuple[str, str], dict[str, int]] = {}

    def _iteration(self) -> tuple[str, int]:
        if not activity.in_activity():
            return "", 1
        info = activity.info()
        seen = self._iterations.setdefault((info.workflow_id or "", info.workflow_run_id or ""), {})
        return info.workflow_id or "", seen.setdefault(info.activity_id, len(seen) + 1)

    def _reply(self, call: ModelCall) -> ModelResult | None:
        if call.role != "plan":
            return None
        workflow_id, iteration = self._iteration()
        inp = plan_call(call, workflow_id, iteration)
        self.calls.append(inp)
        if callable(self._script):
            chosen = self._script(inp)
            if chosen is None:
                return None
        else:
            plans = list(self._script)
            chosen = plans[min(iteration, len(plans)) - 1] if plans else Plan()
        return reply(call, chosen.model_dump(mode="json"), billed=self._billed)


@contextlib.contextmanager
def scripted(plans: Sequence[Plan] | Callable[[PlanCall], Plan | None]) -> Iterator[ScriptedPlanner]:
    """``with scripted(plans) as planner:`` start a worker inside; it plans from ``plans``."""
    planner = ScriptedPlanner(plans)
    with planner.serving():
        yield planner
