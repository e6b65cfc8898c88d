"""``run``, ``status``, ``list``, ``approve``, ``cancel``: starting and steering agent runs."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from typing import Any

from pydantic import ValidationError
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.common import TypedSearchAttributes
from temporalio.exceptions import CancelledError

from keel.cli import ops  # operations commands live in their own module
from keel.cli._output import FORMATS, CliError, add_output, emit_json, fmt, print_table
from keel.cli._render import Progress, render_response, render_status
from keel.cli._waits import await_result, query_status, require_worker
from keel.client import WORKFLOW, Client, RefusedError, Run, RunExistsError, RunNotFoundError
from keel.models import AgentRequest, AgentResponse, ModelPolicy
from keel.money import usd
from keel.redact import redact

__all__ = ["register"]


_RUN_EXAMPLES = """examples:
  starter.py run "Check if order ORD-123 is shipped and refund it if so" --tenant acme --user alice
  starter.py run "Is ORD-124 shipped?" --budget 0.05 --follow      # live progress
  starter.py run "Refund ORD-126" --json > result.json             # machine-readable
  starter.py run "Refund ORD-126" --no-wait                        # print the id, return
  starter.py run --agent operations "Is SKU-KEEL-2 in stock?" --user carol   # another agent

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
    p.add_argument(
        "--agent", default="support", help="agent definition to run (default: support; see 'keel agents')"
    )
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
    out.add_argument("--json", action="store_true", help="print the AgentResponse as JSON (same as -o json)")
    p.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default=None,
        help="table (default), json, or jsonl (with --follow: a JSON line per status, then the result)",
    )
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
        epilog="examples:\n  starter.py status agent/acme/support/r-1234\n"
        "  starter.py status agent/acme/support/r-1234 --json",
        formatter_class=raw,
    )
    s.add_argument("workflow_id", metavar="WORKFLOW_ID", help="e.g. agent/acme/support/r-1234")
    add_output(s)  # -o table|json|jsonl and --json
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
    ls.add_argument("--agent", default=None, help="only this agent's runs")
    ls.add_argument(
        "--status",
        default=None,
        help="only runs in this state",
        choices=["running", "completed", "failed", "cancelled", "terminated", "timed_out"],
    )
    ls.add_argument("--limit", type=int, default=20, help="at most this many (default: 20)")
    add_output(ls)  # -o table|json|jsonl and --json
    ls.set_defaults(func=_list)

    a = sub.add_parser(
        "approve",
        help="approve (or --reject) a step waiting for a human",
        description="Answer a run that waits for a human approval (e.g. a refund over $100). "
        "The decision is recorded in the audit log.",
        epilog="examples:\n  starter.py approve agent/acme/support/r-1234\n"
        "  starter.py approve agent/acme/support/r-1234 --reject --reason 'too much'",
        formatter_class=raw,
    )
    a.add_argument("workflow_id", metavar="WORKFLOW_ID")
    a.add_argument("--step", default="", help="step id (default: the one waiting)")
    a.add_argument("--reject", action="store_true", help="reject instead of approve")
    a.add_argument("--reason", default="", help="recorded in the audit log")
    a.add_argument(
        "--by",
        default=_os_user(),
        help="who decides, recorded in the audit row (default: the operating-system user, "
        f"here {_os_user()!r})",
    )
    add_output(a)  # -o table|json|jsonl and --json
    a.set_defaults(func=_approve)

    c = sub.add_parser(
        "cancel",
        help="cancel a run; its side effects are compensated",
        description="Stop a run: completed side effects are undone in reverse order "
        "(refunds voided, ...) and unused budget is released.",
        epilog="example:\n  starter.py cancel agent/acme/support/r-1234 --reason 'customer withdrew'",
        formatter_class=raw,
    )
    c.add_argument("workflow_id", metavar="WORKFLOW_ID")
    c.add_argument("--reason", default="cancelled by operator", help="recorded in the audit log")
    add_output(c)  # -o table|json|jsonl and --json
    c.set_defaults(func=_cancel)

    ops.register(sub)


def _request(args: argparse.Namespace) -> AgentRequest:
    try:
        return AgentRequest(
            tenant=args.tenant,
            user=args.user,
            agent=args.agent,
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
            "agent": "--agent",
        }.get(field, field)
        raise CliError(f"{flag}: {err['msg'].removeprefix('Value error, ')}") from None


async def _client() -> Client:
    client = await Client.connect()
    client.temporal = _traced(client.temporal)
    return client


def _run_of(client: Client, workflow_id: str) -> Run:
    return client.run(workflow_id)


def _traced(client: Any) -> Any:
    """With ``OTEL_*`` set, the CLI's StartWorkflow span roots the run's trace."""
    import atexit

    from keel.telemetry import setup_telemetry, shutdown_telemetry, with_tracing

    tracer_provider, meter_provider = setup_telemetry("keel-starter")
    if tracer_provider is None:
        return client
    atexit.register(shutdown_telemetry, tracer_provider, meter_provider)
    return with_tracing(client, tracer_provider)


async def _run(args: argparse.Namespace) -> int:
    if args.max_iterations is not None and args.max_iterations < 1:
        raise CliError("--max-iterations must be at least 1")
    for tier in (args.min_tier, args.max_tier):
        if tier not in ("fast", "balanced", "powerful"):
            raise CliError(f"unknown tier {tier!r} (fast, balanced, powerful)")
    req = _request(args)
    client = await _client()
    if not args.no_wait:  # --no-wait may queue a run for a worker that starts later
        await require_worker(client.temporal, client.settings.temporal_namespace, client.settings.task_queue)
    try:
        run = await client.start(req)
    except RunExistsError as e:
        raise CliError(str(e)) from None
    if run.attached:
        print(
            f"attached to the existing run {run.workflow_id} (same request id, same request)", file=sys.stderr
        )
    if args.no_wait:
        print(run.workflow_id)
        return 0
    output = fmt(args)
    if args.follow:
        await _follow(run, client.url(run.workflow_id), client, jsonl=output == "jsonl")
    handle = client.temporal.get_workflow_handle(run.workflow_id, result_type=AgentResponse)
    settings = client.settings
    try:
        resp = await await_result(
            handle,
            client.temporal,
            settings.temporal_namespace,
            settings.task_queue,
            notices=output == "table",
        )
    except WorkflowFailureError as e:
        if not isinstance(e.cause, CancelledError):
            raise
        return await _ended_canceled(handle, client, output)
    if output != "table":
        doc = resp.model_dump(mode="json")
        emit_json({"event": "result", **doc} if args.follow and output == "jsonl" else doc, output)
    else:
        print(redact(render_response(resp, client.url(run.workflow_id))))
    return 0 if resp.outcome in ("completed", "partial") else 3


async def _ended_canceled(handle: Any, client: Client, output: str) -> int:
    """A cancelled run has no result: show what its status says (steps, compensation)."""
    st = await query_status(handle)
    if output != "table":
        emit_json({"temporal_status": "canceled", **(st.model_dump(mode="json") if st else {})}, output)
    elif st is not None:
        print(redact(render_status(st, "canceled", client.url(handle.id))))
    else:
        print(f"{handle.id}: canceled")
    return 3


async def _follow(run: Run, url: str, client: Client, *, jsonl: bool = False) -> None:
    """Draw the run's status snapshots as progress on stderr until it ends; with ``jsonl``
    each snapshot goes to stdout as one JSON line instead (the result line follows). With
    no worker polling the queue it says so after 2 s instead of waiting forever."""
    handle = client.temporal.get_workflow_handle(run.workflow_id)
    if await query_status(handle) is None:
        await require_worker(client.temporal, client.settings.temporal_namespace, client.settings.task_queue)
    if jsonl:
        async for snapshot in run.watch():
            emit_json({"event": "status", **snapshot.model_dump(mode="json")}, "jsonl")
            sys.stdout.flush()
        return
    progress = Progress(
        run.workflow_id,
        url,
        tty=sys.stderr.isatty(),
        unicode=(sys.stderr.encoding or "").lower().startswith("utf"),
    )
    progress.emit(progress.header())
    snapshots = run.watch().__aiter__()
    while True:
        # The spinner ticks while the next snapshot is awaited (a tick per poll interval).
        nxt = asyncio.ensure_future(snapshots.__anext__())
        while not nxt.done():
            await asyncio.wait({nxt}, timeout=0.25)
            if not nxt.done():
                progress.tick(None)
        try:
            st = nxt.result()
        except StopAsyncIteration:
            progress.emit(None)
            return
        for line in progress.update(st):
            progress.emit(line)
        if st.phase == "done":
            progress.emit(None)
            return
        progress.tick(st)


async def _status(args: argparse.Namespace) -> int:
    client = await _client()
    run = _run_of(client, args.workflow_id)
    handle = client.temporal.get_workflow_handle(args.workflow_id)
    try:
        status_name = await run.temporal_status()
    except RunNotFoundError as e:
        raise CliError(str(e)) from None
    st = await query_status(handle)  # bounded: a query with no worker would wait forever
    if st is None and status_name == "completed":
        st = await run.status()  # answered from the result
    if st is None:
        desc = await handle.describe()
        queue = desc.task_queue or client.settings.task_queue
        await require_worker(client.temporal, client.settings.temporal_namespace, queue)
        raise CliError(f"{args.workflow_id} is {status_name} and no worker answered the status query")
    if fmt(args) != "table":
        emit_json({"temporal_status": status_name, **st.model_dump(mode="json")}, fmt(args))
    else:
        print(redact(render_status(st, status_name, client.url(args.workflow_id))))
    return 0


async def _list(args: argparse.Namespace) -> int:
    client = (await _client()).temporal
    query = [f"WorkflowType = '{WORKFLOW}'"]
    if args.tenant:
        if not args.tenant.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise CliError("--tenant: letters, digits, '-', '_' or '.' only")
        query.append(f"KeelTenant = '{args.tenant}'")
    if args.agent:
        if not args.agent.replace("-", "").replace("_", "").isalnum():
            raise CliError("--agent: letters, digits, '-' or '_' only")
        query.append(f"KeelAgent = '{args.agent}'")
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
                "agent": _sa(sa, "KeelAgent"),
                "outcome": _sa(sa, "KeelOutcome"),
                "spend_micros": _sa(sa, "KeelSpendMicros") or 0,
            }
        )
    if fmt(args) != "table":
        emit_json(rows, fmt(args))
        return 0
    if not rows:
        print("no runs")
        return 0
    print_table(
        ["workflow id", "status", "outcome", "agent", "spend", "started"],
        [
            (
                r["workflow_id"],
                r["status"],
                r["outcome"] or "-",
                r["agent"] or "-",
                usd(r["spend_micros"]),
                r["started"],
            )
            for r in rows
        ],
        right=("spend",),
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


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers): still say something true
        import os

        return f"uid {os.getuid()}"


async def _approve(args: argparse.Namespace) -> int:
    client = await _client()
    run = _run_of(client, args.workflow_id)
    try:
        # What is being decided (step, tool, rule, amount, provenance), shown to the approver
        # and printed with the answer (issue 17); the audit row records the same.
        try:
            before = await run.status()
        except RunNotFoundError:
            raise
        except Exception:  # no worker answered the query: the answer still goes through
            before = None
        what = before.waiting_for if before is not None else ""
        if args.reject:
            result = await run.reject(args.step, reason=args.reason, by=args.by)
        else:
            result = await run.approve(args.step, reason=args.reason, by=args.by)
    except RefusedError as e:
        raise CliError(f"refused: {e}") from None
    except RunNotFoundError as e:
        raise CliError(str(e)) from None
    detail = (
        f" by {args.by}"
        + (f": {what}" if what else "")
        + (f" (reason: {args.reason})" if args.reason else "")
    )
    if fmt(args) != "table":
        emit_json(
            {"workflow_id": args.workflow_id, "result": result, "by": args.by, "decided": what}, fmt(args)
        )
        return 0
    print(f"{args.workflow_id}: {redact(result)}{redact(detail)}")
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    """A Temporal cancel request with the reason: the run compensates, then ends Canceled
    (the Web UI's Cancel button does the same)."""
    client = await _client()
    handle = client.temporal.get_workflow_handle(args.workflow_id)
    try:
        desc = await handle.describe()
    except Exception as e:
        from temporalio.service import RPCError, RPCStatusCode

        if isinstance(e, RPCError) and e.status == RPCStatusCode.NOT_FOUND:
            raise CliError(f"no run {args.workflow_id!r}") from None
        raise
    if desc.status != WorkflowExecutionStatus.RUNNING:
        raise CliError(
            f"{args.workflow_id} already ended ({desc.status.name.lower() if desc.status else '?'})"
        )
    await handle.cancel(reason=args.reason)
    result = "cancelling"
    if fmt(args) != "table":
        emit_json({"workflow_id": args.workflow_id, "result": result}, fmt(args))
        return 0
    print(f"{args.workflow_id}: {result} (side effects will be compensated; the run ends Canceled)")
    return 0
