"""Whole-run model doubles: fake OpenAI/Anthropic servers that answer by role, and the bill.

A run with a provider key makes plan, check (judge a plan before its side effects), evaluate
(judge results) and answer calls. :class:`Roles` answers each from its own queue — planner
replies as raw text (sloppy on purpose), verdicts, answers — with fixed, reported usage, and
falls back to an honest default when a queue is empty. :func:`server_bill` prices what the
server answered exactly as a provider would bill it, for comparison with the ledger.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import AsyncConnectionPool

from keel.models import Usage
from keel.pricing import cost_micros
from tests.providers import fake_anthropic as fa
from tests.providers import fake_openai as fo
from tests.providers.fake_http import FakeServer, Recorded, Scripted

__all__ = ["Roles", "ledger_model_rows", "role_of", "server_bill"]

PROMPT_TOKENS = 900
"""Usage every fake reply reports (so each call's cost is known and non-trivial)."""
COMPLETION_TOKENS = 60


def role_of(req: Recorded) -> str:
    """``plan``, ``check`` (plan judged before it runs), ``eval`` or ``answer``."""
    body = req.body
    name = ""
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        name = (fmt.get("json_schema") or {}).get("name", "")
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        name = choice.get("name", "")
    system = json.dumps(body.get("messages", [])[:1]) + json.dumps(body.get("system", ""))
    if name == "plan":
        return "plan"
    if name == "evaluation":
        return "check" if "BEFORE it runs" in system else "eval"
    return "answer"


@dataclass
class Roles:
    """Answers per role; ``anthropic`` selects that wire format (plans as forced tool input
    when they are dicts, as text when they are strings)."""

    anthropic: bool = False
    plans: deque[Any] = field(default_factory=deque)
    checks: deque[dict[str, Any]] = field(default_factory=deque)
    evals: deque[dict[str, Any]] = field(default_factory=deque)
    answers: deque[str] = field(default_factory=deque)
    raw: deque[Scripted] = field(default_factory=deque)
    """Verbatim replies (errors, delays) served before any role queue."""
    default_answer: str = "Here is what I found."

    def __call__(self, req: Recorded) -> Scripted:
        if self.raw:
            return self.raw.popleft()
        role = role_of(req)
        if role == "plan":
            value: Any = self.plans.popleft() if self.plans else {"steps": [], "answer": "Nothing to do."}
        elif role == "check":
            value = (
                self.checks.popleft() if self.checks else {"score": 0.95, "confidence": 0.9, "reason": "ok"}
            )
        elif role == "eval":
            value = self.evals.popleft() if self.evals else {"score": 0.95, "confidence": 0.9, "reason": "ok"}
        else:
            value = self.answers.popleft() if self.answers else self.default_answer
        return self.reply(value, tool="evaluation" if role in ("check", "eval") else "plan")

    def reply(self, value: Any, *, tool: str = "plan", finish: str = "") -> Scripted:
        if isinstance(value, Scripted):
            return value
        usage = {"input_tokens": PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS}
        if self.anthropic:
            if isinstance(value, dict):
                return fa.tool_use(tool, value, **usage)
            return fa.message([{"type": "text", "text": value}], stop_reason=finish or "end_turn", **usage)
        text = value if isinstance(value, str) else json.dumps(value)
        return fo.chat(
            text,
            prompt_tokens=PROMPT_TOKENS,
            completion_tokens=COMPLETION_TOKENS,
            finish_reason=finish or "stop",
        )

    def truncated(self, text: str) -> Scripted:
        """A reply cut at its output cap (``length`` / ``max_tokens``)."""
        return self.reply(text, finish="max_tokens" if self.anthropic else "length")


def _billed(req: Recorded, reply: Scripted, provider: str) -> tuple[str, Usage] | None:
    if reply.status != 200 or not isinstance(reply.body, dict) or "usage" not in reply.body:
        return None
    u = reply.body["usage"]
    model = f"{provider}:{req.body['model']}"
    if provider == "openai":
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return model, Usage(
            input_tokens=u["prompt_tokens"], cached_input_tokens=cached, output_tokens=u["completion_tokens"]
        )
    read, write = u.get("cache_read_input_tokens", 0), u.get("cache_creation_input_tokens", 0)
    return model, Usage(
        input_tokens=u["input_tokens"] + read + write,
        cached_input_tokens=read,
        cache_write_tokens=write,
        output_tokens=u["output_tokens"],
    )


def server_bill(servers: Iterable[tuple[FakeServer, str]]) -> tuple[int, int, list[int]]:
    """(calls answered, calls that reported usage, each such call's cost) over ``servers``."""
    answered, costs = 0, []
    for server, provider in servers:
        for req, reply in server.answered:
            answered += 1
            billed = _billed(req, reply, provider)
            if billed is not None:
                costs.append(cost_micros(*billed))
    return answered, len(costs), costs


async def ledger_model_rows(pool: AsyncConnectionPool, workflow_id: str) -> list[tuple[str, str, int, str]]:
    """The run's model holds: (key, status, actual micros, subject), by key."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select key, status, coalesce(actual_micros, 0), subject from keel_budget_reservations"
            " where run_id = %s and kind = 'model' order by created_at, key",
            (workflow_id,),
        )
        return [(k, s, int(a), subj) for k, s, a, subj in await cur.fetchall()]
