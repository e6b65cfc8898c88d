"""``approvals`` and ``retry``: what waits for a person across runs, and running a stopped
request again without repeating what it already did.

``retry`` starts a new run (``<request id>-retry-N``) of the same request whose succeeded,
not-undone steps are named in ``AgentRequest.reuse_effects``: a step of the new run with the
same id, tool and arguments is answered from the earlier run's effect record, so a refund
issued before the failure is returned, never issued twice. Temporal's own reset (README)
is the other way to the same end; both are tested in ``tests/test_retry.py``.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from keel.cli._output import CliError, add_output, emit_json, fmt, print_table
from keel.redact import redact

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    raw = argparse.RawDescriptionHelpFormatter
    a = sub.add_parser(
        "approvals",
        help="list every step waiting for a person, across runs",
        description="Every running run that waits for a human approval: what it asks, under "
        "which rule, for whom, and for how long it has waited.",
        epilog="examples:\n  starter.py approvals\n  starter.py approvals --tenant acme -o json\n"
        "then: starter.py approve <WORKFLOW_ID> [--reject --reason ...]",
        formatter_class=raw,
    )
    a.add_argument("--tenant", default=None, help="only this tenant's runs")
    a.add_argument("--limit", type=int, default=200, help="look at this many running runs (default 200)")
    add_output(a)
    a.set_defaults(func=_approvals)

    r = sub.add_parser(
        "retry",
        help="run a stopped or failed request again, reusing its recorded effects",
        description="Start the request of a finished run again as a new run. Its steps that "
        "succeeded and were not undone are answered from their recorded effects (same step, "
        "tool and arguments): nothing that happened is done twice.",
        epilog="examples:\n  starter.py retry agent/acme/support/r-1234\n"
        "  starter.py retry agent/acme/support/r-1234 --no-wait\n"
        "see README 'Retry and reset' for Temporal's reset, the other way",
        formatter_class=raw,
    )
    r.add_argument("workflow_id", metavar="WORKFLOW_ID")
    r.add_argument("--no-wait", action="store_true", help="print the new workflow id and return")
    add_output(r)
    r.set_defaults(func=_retry)


def _age(since: datetime | None, now: datetime) -> str:
    if since is None:
        return "-"
    s = int((now - since).total_seconds())
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


async def _approvals(args: argparse.Namespace) -> int:
    from keel.cli._waits import query_status
    from keel.cli.runs import _client, _sa
    from keel.client import WORKFLOW

    client = (await _client()).temporal
    query = [f"WorkflowType = '{WORKFLOW}'", "ExecutionStatus = 'Running'"]
    if args.tenant:
        if not args.tenant.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise CliError("--tenant: letters, digits, '-', '_' or '.' only")
        query.append(f"KeelTenant = '{args.tenant}'")
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    async for wf in client.list_workflows(" AND ".join(query), limit=args.limit):
        st = await query_status(client.get_workflow_handle(wf.id))
        if st is None or not st.waiting_for:
            continue
        rows.append(
            {
                "workflow_id": wf.id,
                "tenant": _sa(wf.typed_search_attributes, "KeelTenant") or "",
                "requester": _sa(wf.typed_search_attributes, "KeelUser") or "",
                "step": st.waiting_step,
                "waiting_since": st.waiting_since.isoformat() if st.waiting_since else None,
                "age": _age(st.waiting_since, now),
                "asks": st.details.removeprefix("waiting for approval: ") or st.waiting_for,
            }
        )
    if fmt(args) != "table":
        emit_json(rows, fmt(args))
        return 0
    if not rows:
        print("nothing is waiting for a person")
        return 0
    print_table(
        ["workflow id", "tenant", "requester", "age", "asks"],
        [(r["workflow_id"], r["tenant"], r["requester"], r["age"], r["asks"]) for r in rows],
    )
    return 0


async def _retry(args: argparse.Namespace) -> int:
    from temporalio.client import WorkflowExecutionStatus

    from keel.agents import workflow_id
    from keel.cli._render import render_response
    from keel.cli._waits import await_result, query_status, require_worker
    from keel.cli.runs import _client
    from keel.models import AgentRequest, ReusedEffect, StepState
    from keel.submit import RequestIdConflict, start_or_attach

    keel_client = await _client()
    client, settings = keel_client.temporal, keel_client.settings
    old = client.get_workflow_handle(args.workflow_id)
    desc = await old.describe()
    if desc.status == WorkflowExecutionStatus.RUNNING:
        raise CliError(f"{args.workflow_id} is still running: cancel it first, or wait for it to end")
    history = await old.fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    [req] = await client.data_converter.decode(
        started.input.payloads[:1], [AgentRequest]
    )  # through the codec
    await require_worker(client, settings.temporal_namespace, desc.task_queue or settings.task_queue)
    st = await query_status(old)  # the step records (with their arguments) as the run left them
    if st is None:
        raise CliError(f"{args.workflow_id}: no worker answered for its steps; try again")
    earlier = {r.step_id: r.key for r in req.reuse_effects}  # a retry of a retry keeps the first keys
    reuse = tuple(
        ReusedEffect(
            step_id=s.id, tool=s.tool, args=s.args, key=earlier.get(s.id, f"{args.workflow_id}/{s.id}")
        )
        for s in st.steps
        if s.state == StepState.SUCCEEDED  # compensated steps were undone: they must act anew
    )
    base = req.request_id.split("-retry-")[0]
    n = 1
    while True:
        rid = f"{base}-retry-{n}"
        wid = workflow_id(req.tenant, req.agent, rid)
        try:
            await client.get_workflow_handle(wid).describe()
        except Exception:
            break
        n += 1
    new_req = req.model_copy(update={"request_id": rid, "reuse_effects": reuse})
    try:
        handle, _ = await start_or_attach(
            client,
            new_req,
            task_queue=settings.task_queue,
            static_summary=f"retry of {args.workflow_id}: {req.message[:60]}",
        )
    except RequestIdConflict as e:
        raise CliError(str(e)) from None
    reused = ", ".join(r.step_id for r in reuse) or "none"
    if args.no_wait:
        if fmt(args) != "table":
            emit_json(
                {
                    "workflow_id": wid,
                    "retry_of": args.workflow_id,
                    "reused_steps": [r.step_id for r in reuse],
                },
                fmt(args),
            )
        else:
            print(wid)
        return 0
    if fmt(args) == "table":
        print(f"retrying {args.workflow_id} as {wid}; recorded effects reused for: {reused}")
    resp = await await_result(
        handle, client, settings.temporal_namespace, settings.task_queue, notices=fmt(args) == "table"
    )
    if fmt(args) != "table":
        emit_json({"retry_of": args.workflow_id, **resp.model_dump(mode="json")}, fmt(args))
    else:
        print(redact(render_response(resp, keel_client.url(wid))))
    return 0 if resp.outcome in ("completed", "partial") else 3
