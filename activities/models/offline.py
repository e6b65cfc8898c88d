"""The offline model: deterministic, needs no key, and says so in every output.

It is a real implementation of the model interface, not a mock: it plans by reading the
request and the tool catalogue it is offered (names and argument schemas), so a tool the
caller may not use is never planned, and it answers from the executed steps. Token usage is
estimated (4 characters per token) so budgets behave as with a paid model.

Prompt protocol (shared with ``keel.activities.planning``): the request is the first user message
after ``REQUEST:``; results of executed steps arrive in a user message that starts with
``EXECUTED STEPS`` followed by one JSON object per line.
"""

from __future__ import annotations

import json
import re
from typing import Any

from keel.models import ModelCall, ModelResult, Usage

__all__ = [
    "OFFLINE_DONE",
    "REFUND_REPORT_CODE",
    "OfflineModel",
    "offline_plan",
    "respond_text",
]

OFFLINE_DONE = "Nothing more to do."
"""The offline planner's answer when steps have run and none are left: a plan with no steps
must carry an answer; the run's message is the summary of the steps (see ``respond_text``)."""

_ORDER = re.compile(r"\bORD-\d{1,12}\b")
_SKU = re.compile(r"\bSKU-[A-Z0-9-]{1,32}\b")
_AMOUNT = re.compile(r"\$\s?(\d+(?:\.\d{1,2})?)")
_CONDITIONAL = re.compile(r"\bif (so|it is|it's|it has|shipped|delivered)\b|\bonly if\b", re.I)
_EMAIL_WORDS = (
    "email",
    "e-mail",
    "notify",
    "tell the customer",
    "let the customer know",
    "message the customer",
)


REFUND_REPORT_CODE = """\
import json

orders = json.load(open("orders.json"))
refunds = json.load(open("refunds.json"))
by_status = {}
refundable = []
for o in orders:
    s = by_status.setdefault(o["status"], {"orders": 0, "total_usd": 0.0, "refunded_usd": 0.0})
    s["orders"] += 1
    s["total_usd"] = round(s["total_usd"] + o["total_usd"], 2)
    s["refunded_usd"] = round(s["refunded_usd"] + o["refunded_usd"], 2)
    left = round(o["total_usd"] - o["refunded_usd"], 2)
    if o["status"] in ("shipped", "delivered") and left > 0:
        refundable.append((left, o["order_id"]))
refundable.sort(reverse=True)
print(json.dumps({
    "report": "refunds",
    "orders": len(orders),
    "refunds_issued": sum(1 for r in refunds if r["status"] == "issued"),
    "refunded_usd": round(sum(o["refunded_usd"] for o in orders), 2),
    "refundable_usd": round(sum(v for v, _ in refundable), 2),
    "refundable_orders": len(refundable),
    "largest_refundable": [{"order_id": i, "usd": v} for v, i in refundable[:3]],
    "by_status": by_status,
}, sort_keys=True))
"""
"""The snippet the offline planner writes for a refund report (it runs in ``run_python``'s
sandbox over the tenant's ``orders.json`` and ``refunds.json``)."""


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _request_text(call: ModelCall) -> str:
    for m in call.messages:
        if m.role == "user" and m.content.startswith("REQUEST:"):
            return m.content[len("REQUEST:") :].strip().split("\n<<<", 1)[0]
    users = [m.content for m in call.messages if m.role == "user"]
    return users[0] if users else ""


def _executed(call: ModelCall) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in call.messages:
        if m.role == "user" and m.content.startswith("EXECUTED STEPS"):
            for line in m.content.splitlines()[1:]:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
    return out


def offline_plan(request: str, tools: set[str], executed: list[dict[str, Any]]) -> dict[str, Any]:
    """Plan for ``request`` using only ``tools``; returns a dict matching ``keel.models.Plan``."""
    lower = request.lower()
    if executed:
        return _replan(request, executed)
    if "refund" in lower and "report" in lower:
        if "run_python" not in tools:
            return {"steps": [], "answer": "Not permitted or not possible here: run_python.", "replan": False}
        step = {
            "id": "s1",
            "tool": "run_python",
            "args": {"code": REFUND_REPORT_CODE, "datasets": ["orders", "refunds"]},
            "why": "compute the refund report over the tenant's orders in the sandbox",
            "when": None,
        }
        return {"steps": [step], "answer": "", "replan": False}
    orders = list(dict.fromkeys(_ORDER.findall(request)))
    skus = list(dict.fromkeys(_SKU.findall(request)))
    wants_refund = "refund" in lower
    wants_email = any(w in lower for w in _EMAIL_WORDS)
    conditional = bool(_CONDITIONAL.search(request))
    amount = _AMOUNT.search(request)
    steps: list[dict[str, Any]] = []
    missing: list[str] = []

    def add(tool: str, args: dict[str, Any], why: str, when: dict[str, Any] | None = None) -> None:
        if tool not in tools:
            missing.append(tool)
            return
        steps.append({"id": f"s{len(steps) + 1}", "tool": tool, "args": args, "why": why, "when": when})

    for order in orders:
        add("lookup_order", {"order_id": order}, f"find the status of {order}")
        lookup = steps[-1]["id"] if steps and steps[-1]["tool"] == "lookup_order" else None
        guard = {"step": lookup, "field": "shipped", "equals": True} if conditional and lookup else None
        if wants_refund:
            # Refund only what is left: a second request for the same order refunds nothing.
            refund_guard = (
                {"step": lookup, "field": "refundable", "equals": True}
                if lookup and (conditional or not amount)
                else guard
            )
            total = f"${{{lookup}.refundable_usd}}" if lookup else None
            value: Any = float(amount.group(1)) if amount else total
            if value is not None:
                add(
                    "issue_refund",
                    {"order_id": order, "amount_usd": value, "reason": "customer request"},
                    f"refund {order} as asked",
                    refund_guard,
                )
        if wants_email and lookup:
            what = "a refund has been issued" if wants_refund else "here is an update"
            add(
                "send_email",
                {
                    "to": f"${{{lookup}.customer_email}}",
                    "subject": f"Your order {order}",
                    "body": f"Hello, about your order {order}: {what}.",
                },
                f"tell the customer about {order}",
                guard,
            )
    wants_ticket = "ticket" in lower
    for sku in skus:
        add("check_inventory", {"sku": sku}, f"check stock of {sku}")
        check = steps[-1]["id"] if steps and steps[-1]["tool"] == "check_inventory" else None
        if wants_ticket:
            only_if_out = check and re.search(r"\bif (not|it is not|it's not|out)\b|out of stock", lower)
            priority = "high" if "urgent" in lower else "normal"
            add(
                "open_ticket",
                {"title": f"Restock {sku}", "sku": sku, "priority": priority, "body": request[:500]},
                f"ask the warehouse team to restock {sku}",
                {"step": check, "field": "in_stock", "equals": False} if only_if_out else None,
            )
    if not orders and not skus and ("stock" in lower or "inventory" in lower):
        missing.append("a SKU like SKU-KEEL-1")
    answer = ""
    if not steps:
        answer = (
            "I can look up orders (ORD-123), check stock (SKU-KEEL-1), issue refunds and "
            "e-mail customers. Please name an order or SKU."
        )
    if missing:
        answer = (
            "Not permitted or not possible here: " + ", ".join(sorted(set(missing))) + ". " + answer
        ).strip()
    watching = "until" in lower and "ship" in lower
    return {"steps": steps, "answer": answer, "replan": watching and bool(steps)}


def _replan(request: str, executed: list[dict[str, Any]]) -> dict[str, Any]:
    """After a round of steps: stop, unless the request asks to keep watching ("until")."""
    lower = request.lower()
    if "until" in lower and "ship" in lower:
        last = [e for e in executed if e.get("tool") == "lookup_order"]
        if last and not (last[-1].get("data") or {}).get("shipped"):
            order = (last[-1].get("args") or {}).get("order_id", "")
            n = len(executed) + 1
            return {
                "steps": [
                    {
                        "id": f"s{n}",
                        "tool": "lookup_order",
                        "args": {"order_id": order},
                        "why": "still waiting to ship",
                    }
                ],
                "answer": "",
                "replan": True,
            }
    # Done. A plan with no steps must say so in its answer (keel.models.Plan), and the
    # run's summary of what happened is written from the steps by the finish step.
    return {"steps": [], "answer": OFFLINE_DONE, "replan": False}


def respond_text(request: str, executed: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for e in executed:
        tool, data, state = e.get("tool"), e.get("data") or {}, e.get("state")
        if state == "skipped":
            lines.append(f"Skipped {tool}: {e.get('summary') or 'condition not met'}.")
        elif state != "succeeded":
            lines.append(f"Could not {tool}: {e.get('error') or state}.")
        elif tool == "lookup_order":
            refunded = data.get("refunded_usd") or 0
            lines.append(
                f"Order {data.get('order_id')} is {data.get('status')} "
                f"(total {_money(data.get('total_usd'))}"
                + (f", {_money(refunded)} already refunded" if refunded else "")
                + ")."
            )
        elif tool == "issue_refund":
            lines.append(
                f"Refunded {_money(data.get('amount_usd'))} on {data.get('order_id')} "
                f"(refund #{data.get('refund_id')})."
            )
        elif tool == "send_email":
            lines.append(f"E-mailed {data.get('to')} (message #{data.get('message_id')}).")
        elif tool == "run_python" and (data.get("output") or {}).get("report") == "refunds":
            lines.append(_refund_report_text(data["output"]))
        elif tool in ("run_python", "run_command"):
            out = str(data.get("stdout") or "").strip()
            lines.append(f"{tool} exited {data.get('exit_code')}: {out[:300] or '(no output)'}")
        elif tool == "open_ticket":
            lines.append(f"Opened ticket #{data.get('ticket_id')} ({data.get('title')}).")
        elif tool == "check_inventory":
            lines.append(f"{data.get('name')} ({data.get('sku')}): {data.get('quantity')} in stock.")
        else:
            lines.append(f"{tool}: {e.get('summary', 'done')}.")
    return " ".join(lines) if lines else "Nothing needed doing."


def _refund_report_text(r: dict[str, Any]) -> str:
    top = ", ".join(f"{x.get('order_id')} (${x.get('usd')})" for x in r.get("largest_refundable") or [])
    by_status = r.get("by_status") or {}
    statuses = ", ".join(f"{k} {v.get('orders')}" for k, v in sorted(by_status.items()))
    return (
        f"Refund report: {r.get('orders')} orders ({statuses}); ${r.get('refunded_usd')} refunded in "
        f"{r.get('refunds_issued')} refunds; ${r.get('refundable_usd')} still refundable on "
        f"{r.get('refundable_orders')} shipped or delivered orders"
        + (f", largest: {top}" if top else "")
        + "."
    )


def _judge(executed: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [e for e in executed if e.get("state") != "skipped"]
    if not ran:
        return {"score": 1.0, "confidence": 0.6, "reason": "no tool was needed"}
    ok = sum(1 for e in ran if e.get("state") == "succeeded")
    return {
        "score": round(ok / len(ran), 3),
        "confidence": 0.9,
        "reason": f"{ok} of {len(ran)} steps succeeded",
    }


class OfflineModel:
    """Deterministic stand-in for a provider; same interface as the OpenAI/Anthropic ones."""

    async def complete(self, call: ModelCall) -> ModelResult:
        request = _request_text(call)
        executed = _executed(call)
        parsed: dict[str, Any] | None = None
        if call.role == "plan":
            tools = {t.get("name", "") for t in call.tools_doc}
            parsed = offline_plan(request, tools, executed)
            text = json.dumps(parsed, sort_keys=True)
        elif call.role == "evaluate":
            parsed = _judge(executed)
            text = json.dumps(parsed, sort_keys=True)
        elif call.role == "classify":
            parsed = {"injection": False, "reason": "offline classifier defers to heuristics"}
            text = json.dumps(parsed)
        else:
            text = respond_text(request, executed)
        prompt = (
            call.system
            + "".join(m.content for m in call.messages)
            + json.dumps(list(call.tools_doc), sort_keys=True)
        )
        usage = Usage(input_tokens=_tokens(prompt), output_tokens=min(_tokens(text), call.max_tokens))
        return ModelResult(
            text=text, parsed=parsed, usage=usage, model="offline", provider="offline", latency_ms=0.0
        )


def _money(value: object) -> str:
    """``$42.50``, as people write money (a tool's ``42.5`` is a number, not a text)."""
    try:
        return f"${float(str(value)):,.2f}"
    except ValueError:
        return f"${value}"
