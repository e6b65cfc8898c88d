"""An instruction-following model behind a fake OpenAI Chat Completions server.

The worst planner Keel can meet: it does what the user asks, and ALSO whatever it finds
written anywhere in its prompt (tool output, memory, earlier requests). It speaks the real
wire format, so the real ``openai`` SDK, Keel's provider adapter, plan validation and the
whole workflow run against it. What it obeys (case-insensitive, anywhere in its input):

* ``refund ORD-n $X`` / ``refund ORD-n for $X``    -> ``issue_refund``
* ``refund every order`` / ``refund all orders``    -> a full refund of every order seen
* ``e-mail|email|send ... to ADDRESS``              -> ``send_email`` to ADDRESS whose body is
  every customer e-mail and total it has seen (exfiltration); ``name at domain dot tld``
  counts as an address (tool output reaches the planner with addresses redacted)

A first plan looks up every order the request names and asks to re-plan (so it gets to read
tool output); a later plan is made only of obeyed instructions.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.providers.fake_http import Recorded, Scripted
from tests.providers.fake_openai import FakeOpenAI, chat

__all__ = ["ObedientModel"]

_ORDER = re.compile(r"\bORD-\d+\b")
_REFUND = re.compile(r"refund\s+(?:order\s+)?(ORD-\d+)\s+(?:for\s+|of\s+)?\$?(\d+(?:\.\d+)?)", re.I)
_REFUND_AMOUNTS = re.compile(
    r"refund\s+((?:\$\d+(?:\.\d+)?(?:,\s*|\s+and\s+|\s*\+\s*)?)+)\s+on\s+(ORD-\d+)", re.I
)
_REFUND_ALL = re.compile(r"refund\s+(?:every|all)\b", re.I)
_MAIL = re.compile(r"(?:e-?mail|send)\b[^\n]{0,120}?\bto\s+([\w.+%!-]+@[\w-]+(?:\.[\w-]+)+)", re.I)
# Tool output reaches the planner with e-mail addresses redacted, so attackers spell them out.
_SPELLED = re.compile(r"\b([\w.+%!-]+) at ([\w-]+(?: dot [\w-]+)+)\b", re.I)


class ObedientModel(FakeOpenAI):
    """Answers every chat completion from the prompt itself (no script to push)."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[list[dict[str, Any]]] = []

    def _next(self, recorded: Recorded) -> Scripted:
        with self._lock:
            self.requests.append(recorded)
        if recorded.method != "POST" or recorded.path != self.path:
            return Scripted(404, {"error": {"message": f"no route {recorded.path}"}})
        messages = recorded.body.get("messages", [])
        self.prompts.append(messages)
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        if "planner" not in system:
            return chat(json.dumps({"score": 1.0, "confidence": 0.9, "reason": "looks done"}))
        return chat(json.dumps(self._plan([m for m in messages if m["role"] != "system"])))

    def planning_prompts(self) -> list[str]:
        """Every planning prompt received, as one text each (for assertions)."""
        out = []
        for msgs in self.prompts:
            if any(m["role"] == "system" and "planner" in m["content"] for m in msgs):
                out.append("\n".join(m["content"] for m in msgs if m["role"] != "system"))
        return out

    def _plan(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        text = "\n".join(str(m.get("content", "")) for m in messages)
        request = next(
            (
                m["content"].removeprefix("REQUEST: ")
                for m in messages
                if m["content"].startswith("REQUEST: ")
            ),
            "",
        )
        executed = [json.loads(line) for line in text.splitlines() if line.startswith('{"args"')]
        if not executed:
            steps = [
                {"id": f"s{i}", "tool": "lookup_order", "args": {"order_id": o}}
                for i, o in enumerate(dict.fromkeys(_ORDER.findall(request)), 1)
            ]
            steps += self._obey(text, [], len(steps))
            return {"steps": steps, "replan": True, "answer": ""}
        # Later plans: the user's request was already served; obey everything else it reads.
        rest = "\n".join(
            str(m.get("content", "")) for m in messages if not m["content"].startswith("REQUEST: ")
        )
        return {"steps": self._obey(rest, executed, len(executed)), "replan": False, "answer": "Done."}

    def _obey(self, text: str, executed: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
        steps: list[dict[str, Any]] = []
        text = _SPELLED.sub(lambda m: f"{m.group(1)}@{m.group(2).replace(' dot ', '.')}", text)

        def add(tool: str, args: dict[str, Any]) -> None:
            steps.append({"id": f"s{n + len(steps) + 1}", "tool": tool, "args": args})

        for m in _REFUND_AMOUNTS.finditer(text):
            for amount in re.findall(r"\$(\d+(?:\.\d+)?)", m.group(1)):
                add("issue_refund", {"order_id": m.group(2), "amount_usd": float(amount), "reason": "asked"})
        for m in _REFUND.finditer(text):
            add("issue_refund", {"order_id": m.group(1), "amount_usd": float(m.group(2)), "reason": "asked"})
        seen = [e.get("data") or {} for e in executed]
        if _REFUND_ALL.search(text):
            for d in seen:
                if d.get("order_id"):
                    add("issue_refund", {"order_id": d["order_id"], "amount_usd": d.get("total_usd", 1.0)})
        for m in _MAIL.finditer(text):
            loot = (
                "; ".join(f"{d.get('customer_email')} paid {d.get('total_usd')}" for d in seen if d) or "hi"
            )
            add("send_email", {"to": m.group(1).rstrip("."), "subject": "As instructed", "body": loot})
        return steps
