"""``run``, ``status``, ``list``, ``approve``, ``cancel``: starting and steering agent runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import TypedSearchAttributes

from keel.cli import CliError
from keel.cli._render import Progress, render_response, render_status
from keel.models import AgentRequest, AgentResponse, Approval, ModelPolicy, RunStatus
from keel.redact import redact, redact_data
from keel.settings import Settings, load_settings

__all__ = ["register"]

WORKFLOW = "AgentWorkflow"


_RUN_EXAMPLES = """examples:
  starter.py run "Check if order ORD-123 is shipped and refund it if so" --tenant acme --user alice
  starter.py run "Is ORD-124 shipped?" --budget 0.05 --follow      # live progress
  starter.py run "Refund ORD-126" --json > result.json             # machine-readable
  starter.py run "Refund ORD-126" --no-wait                        # print the id, return

exit status: 0 completed or partial, 3 any other outcome (denied, budget, ...),
1 infrastructure error, 2 bad arguments."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "run",
        help="start an agent run and print its result",
        description="Start an agent run (one durable Temporal workflow) and wait for its answer. "
        "Every model call and tool action is checked against the tenant's policy "
        "and budget first; the run survives worker crashes.",
        epilog=_RUN_EXAMPLES,
        formatter_class=raw,
    )
    p.add_argument("message", help="what the agent should do")
    p.add_argument("--tenant", default="acme", help="tenant the run belongs to (default: acme)")
    p.add_argument("--user", default="alice", help="user on whose behalf it runs (default: alice)")
    p.add_argument(
        "--perm",
        action="append",
        default=[],
        metavar="PERMISSION",
        help="narrow the run to these permissions (repeatable; default: all the policy grants the user)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=1.0,
        metavar="USD",
        help="hard budget for this run in USD (default: 1.00)",
    )
    p.add_argument("--session", default="default", help="memory session (default: default)")
    p.add_argument("--workspace", default="default", help="budget workspace (default: default)")
    p.add_argument("--request-id", default="", help="idempotent request id (default: random)")
    p.add_argument("--min-tier", default="fast", help="cheapest model tier to start from")
    p.add_argument("--max-tier", default="powerful", help="highest tier escalation may reach")
    p.add_argument("--max-iterations", type=int, default=None, help="override the policy's cap")
    p.add_argument(
        "--deadline",
        type=int,
        default=None,
        metavar="SECONDS",
        help="override the policy's wall-clock deadline",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the AgentResponse as JSON")
    out.add_argument("--no-wait", action="store_true", help="print the workflow id and return")
    out.add_argument(
        "--follow",
        action="store_true",
        help="show live progress (phases, steps, spend) on stderr while it runs",
    )
    p.set_defaults(func=_run)

    s = sub.add_parser(
        "status",
        help="show a run's live plan, steps and spend",
        description="Ask a run (running or finished) for its phase, steps, spend and what it waits for.",
        epilog="examples:\n  starter.py status agent/acme/r-1234\n"
        "  starter.py status agent/acme/r-1234 --json",
        formatter_class=raw,
    )
    s.add_argument("workflow_id", metavar="WORKFLOW_ID", help="e.g. agent/acme/r-1234")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.set_defaults(func=_status)

    ls = sub.add_parser(
        "list",
        help="list recent runs",
        description="List runs from Temporal's visibility store, newest first.",
        epilog="examples:\n  starter.py list --tenant acme --status running\n"
        "  starter.py list --status failed --limit 50 --json",
        formatter_class=raw,
    )
    ls.add_argument("--tenant", default=None, help="only this tenant's runs")
    ls.add_argument(
        "--status",
        default=None,
        help="only runs in this state",
        choices=["running", "completed", "failed", "cancelled", "terminated", "timed_out"],
    )
    ls.add_argument("--limit", type=int, default=20, help="at most this many (default: 20)")
    ls.add_argument("--json", action="store_true", help="print the runs as JSON")
    ls.set_defaults(func=_list)

    a = sub.add_parser(
        "approve",
        help="approve (or --reject) a step waiting for a human",
        description="Answer a run that waits for a human approval (e.g. a refund over $100). "
        "The decision is recorded in the audit log.",
        epilog="examples:\n  starter.py approve agent/acme/r-1234\n"
        "  starter.py approve agent/acme/r-1234 --reject --reason 'too much'",
        formatter_class=raw,
    )
    a.add_argument("workflow_id", metavar="WORKFLOW_ID")
    a.add_argument("--step", default="", help="step id (default: the one waiting)")
    a.add_argument("--reject", action="store_true", help="reject instead of approve")
    a.add_argument("--reason", default="", help="recorded in the audit log")
    a.add_argument("--by", default="operator", help="who decides (recorded in the audit log)")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(func=_approve)

    c = sub.add_parser(
        "cancel",
        help="cancel a run; its side effects are compensated",
        description="Stop a run: completed side effects are undone in reverse order "
        "(refunds voided, ...) and unused budget is released.",
        epilog="example:\n  starter.py cancel agent/acme/r-1234 --reason 'customer withdrew'",
        formatter_class=raw,
    )
    c.add_argument("workflow_id", metavar="WORKFLOW_ID")
    c.add_argument("--reason", default="cancelled by operator", help="recorded in the audit log")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=_cancel)

    from keel.cli import ops  # operations commands live in their own module

    ops.register(sub)


def _request(args: argparse.Namespace) -> AgentRequest:
    try:
        return AgentRequest(
            tenant=args.tenant,
            user=args.user,
            message=args.message,
            request_id=args.request_id or f"r-{uuid.uuid4().hex[:10]}",
            session=args.session,
            workspace=args.workspace,
            permissions=tuple(args.perm),
            max_budget_usd=args.budget,
            model_policy=ModelPolicy(min_tier=args.min_tier, max_tier=args.max_tier),
            max_iterations=args.max_iterations,
            deadline_seconds=args.deadline,
        )
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "request"
        flag = {
            "max_budget_usd": "--budget",
            "tenant": "--tenant",
            "user": "--user",
            "message": "message",
            "session": "--session",
            "workspace": "--workspace",
            "request_id": "--request-id",
            "permissions": "--perm",
            "max_iterations": "--max-iterations",
            "deadline_seconds": "--deadline",
            "model_policy.min_tier": "--min-tier",
            "model_policy.max_tier": "--max-tier",
        }.get(field, field)
        raise CliError(f"{flag}: {err['msg'].removeprefix('Value error, ')}") from None


def _json(data: Any) -> str:
    """CLI JSON output: step results and summaries carry raw tool output, so every string
    is redacted (secrets and PII) before it reaches a terminal, a log or a pipe."""
    return json.dumps(redact_data(data), indent=2, ensure_ascii=False)


def workflow_url(settings: Settings, workflow_id: str) -> str:
    return (
        f"{settings.ui_url}/namespaces/{settings.temporal_namespace}/workflows/{quote(workflow_id, safe='')}"
    )


async def _client() -> tuple[Client, Settings]:
    from keel.client import connect

    settings = load_settings()
    return _traced(await connect(settings)), settings


def _traced(client: Client) -> Client:
    """With ``OTEL_*`` set, the CLI's StartWorkflow span roots the run's trace."""
    import atexit

    from keel.telemetry import setup_telemetry, shutdown_telemetry, with_tracing

    tracer_provider, meter_provider = setup_telemetry("keel-starter")
    if tracer_provider is None:
        return client
    atexit.register(shutdown_telemetry, tracer_provider, meter_provider)
    return with_tracing(client, tracer_provider)


async def _run(args: argparse.Namespace) -> int:
    from keel.submit import RequestIdConflict, start_or_attach

    if args.max_iterations is not None and args.max_iterations < 1:
        raise CliError("--max-iterations must be at least 1")
    for tier in (args.min_tier, args.max_tier):
        if tier not in ("fast", "balanced", "powerful"):
            raise CliError(f"unknown tier {tier!r} (fast, balanced, powerful)")
    req = _request(args)
    client, settings = await _client()
    try:
        handle, attached = await start_or_attach(
            client,
            req,
            task_queue=settings.task_queue,
            # Temporal shows the summary in the UI and lists; redact before cutting, so a cut
            # can never leave the head of a key that no longer matches its pattern.
            static_summary=f"{req.tenant}/{req.user}: {redact(req.message)[:80]}",
        )
    except RequestIdConflict as e:
        raise CliError(str(e)) from None
    wid = handle.id
    if attached:
        print(f"attached to the existing run {wid} (same request id, same request)", file=sys.stderr)
    if args.no_wait:
        print(wid)
        return 0
    if args.follow:
        await _follow(handle, workflow_url(settings, wid))
    resp = await handle.result()
    if args.json:
        print(_json(resp.model_dump(mode="json")))
    else:
        print(redact(render_response(resp, workflow_url(settings, wid))))
    return 0 if resp.outcome in ("completed", "partial") else 3


async def _follow(handle: WorkflowHandle[Any, AgentResponse], url: str) -> None:
    """Poll the status query and draw progress on stderr until the run ends."""
    progress = Progress(
        handle.id, url, tty=sys.stderr.isatty(), unicode=(sys.stderr.encoding or "").lower().startswith("utf")
    )
    progress.emit(progress.header())
    while True:
        try:
            st: RunStatus | None = await handle.query("status", result_type=RunStatus)
        except Exception:
            st = None  # no worker has picked the run up yet
        if st is not None:
            for line in progress.update(st):
                progress.emit(line)
            if st.phase == "done":
                progress.emit(None)
                return
        desc = await handle.describe()
        if desc.status != WorkflowExecutionStatus.RUNNING:
            progress.emit(None)
            return
        progress.tick(st)
        await asyncio.sleep(0.25)


async def _status(args: argparse.Namespace) -> int:
    client, settings = await _client()
    handle = client.get_workflow_handle(args.workflow_id)
    desc = await handle.describe()
    status_name = desc.status.name.lower() if desc.status else "unknown"
    try:
        st: RunStatus | None = await handle.query("status", result_type=RunStatus)
    except Exception:
        st = None
    if st is None and desc.status == WorkflowExecutionStatus.COMPLETED:
        resp = await client.get_workflow_handle(args.workflow_id, result_type=AgentResponse).result()
        st = RunStatus(
            workflow_id=args.workflow_id,
            phase="done",
            steps=resp.steps,
            spend=resp.spend,
            iterations=resp.iterations,
            model_label=resp.model_label,
            outcome=resp.outcome,
        )
    if st is None:
        raise CliError(
            f"{args.workflow_id} is {status_name} and no worker answered the status "
            "query (is a worker running?)"
        )
    if args.json:
        print(_json({"temporal_status": status_name, **st.model_dump(mode="json")}))
    else:
        print(redact(render_status(st, status_name, workflow_url(settings, args.workflow_id))))
    return 0


async def _list(args: argparse.Namespace) -> int:
    client, _ = await _client()
    query = [f"WorkflowType = '{WORKFLOW}'"]
    if args.tenant:
        if not args.tenant.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise CliError("--tenant: letters, digits, '-', '_' or '.' only")
        query.append(f"KeelTenant = '{args.tenant}'")
    if args.status:
        query.append(f"ExecutionStatus = '{_STATUS[args.status]}'")
    rows = []
    async for wf in client.list_workflows(" AND ".join(query), limit=args.limit):
        sa = wf.typed_search_attributes
        rows.append(
            {
                "workflow_id": wf.id,
                "status": wf.status.name.lower() if wf.status else "",
                "started": wf.start_time.isoformat(timespec="seconds") if wf.start_time else "",
                "tenant": _sa(sa, "KeelTenant"),
                "user": _sa(sa, "KeelUser"),
                "outcome": _sa(sa, "KeelOutcome"),
                "spend_usd": (_sa(sa, "KeelSpendMicros") or 0) / 1e6,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no runs")
        return 0
    print(f"{'WORKFLOW ID':<34} {'STATUS':<10} {'OUTCOME':<16} {'SPEND USD':>10}  STARTED")
    for r in rows:
        print(
            f"{r['workflow_id']:<34} {r['status']:<10} {r['outcome'] or '-':<16} "
            f"{r['spend_usd']:>10.6f}  {r['started']}"
        )
    return 0


_STATUS = {
    "running": "Running",
    "completed": "Completed",
    "failed": "Failed",
    "cancelled": "Canceled",
    "terminated": "Terminated",
    "timed_out": "TimedOut",
}


def _sa(attrs: TypedSearchAttributes, name: str) -> Any:
    for pair in attrs:
        if pair.key.name == name:
            return pair.value
    return None


async def _approve(args: argparse.Namespace) -> int:
    client, _ = await _client()
    handle = client.get_workflow_handle(args.workflow_id)
    result = await handle.execute_update(
        "approve",
        Approval(approve=not args.reject, step_id=args.step, reason=args.reason, by=args.by),
        result_type=str,
    )
    print(
        json.dumps({"workflow_id": args.workflow_id, "result": redact(result)})
        if args.json
        else f"{args.workflow_id}: {redact(result)}"
    )
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    client, _ = await _client()
    handle = client.get_workflow_handle(args.workflow_id)
    result = await handle.execute_update("cancel", args.reason, result_type=str)
    print(
        json.dumps({"workflow_id": args.workflow_id, "result": redact(result)})
        if args.json
        else f"{args.workflow_id}: {redact(result)} (side effects will be compensated)"
    )
    return 0
