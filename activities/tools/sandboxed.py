"""Code and command tools: ``run_python`` and ``run_command``, each confined by the sandbox.

They are ordinary registry tools: the same ``run_tool`` activity runs them under the gate,
the budget, the audit log and exactly-once (a retried step returns the recorded result,
it does not run the code again). What differs is where the work happens: in a bubblewrap
child with the limits of ``activities/sandbox.py``, never in the worker.

``run_python`` is how a planner computes over business data without being handed the
database: it names datasets (``orders``, ``refunds``), the tool reads the *caller's
tenant's* rows inside the step's transaction and copies them into the working directory as
``<name>.json`` (customer e-mails are left out: the snippet has no use for them). The
snippet prints its answer; a JSON object on stdout becomes ``output``.

Only a clean exit is a result for ``run_python`` (a failing snippet is a failed step, so the
evaluator and the error-rate flag see it). ``run_command`` reports any normal exit code as
data (``grep`` finding nothing exits 1), and fails only when a limit ended the program.
Either way the result carries the exit status and the resource use.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from keel.activities.sandbox import SandboxLimits, SandboxResult, SandboxSpec, sandbox_python
from keel.activities.tools.registry import ToolContext, ToolError, tool

__all__ = ["COMMANDS", "PYTHON_SANDBOX", "COMMAND_SANDBOX", "RunCommand", "RunPython", "result_data"]

COMMANDS = ("cat", "cut", "echo", "grep", "head", "ls", "printf", "tail", "tr", "uniq", "wc")
"""``run_command``'s allow-list: read-and-filter programs that cannot start others (no
shells, ``env``, ``xargs``, ``find``, ``awk``, ``sed`` or ``sort``, each of which can)."""

PYTHON_SANDBOX = SandboxSpec(
    executables=(sandbox_python(),),
    limits=SandboxLimits(cpu_seconds=5, memory_mb=512, max_processes=16, wall_seconds=15),
)
COMMAND_SANDBOX = SandboxSpec(
    executables=COMMANDS,
    limits=SandboxLimits(cpu_seconds=2, memory_mb=256, max_processes=8, wall_seconds=5),
)
OUTPUT_CHARS = 2000
"""Characters of stdout/stderr kept in the step result (the history stays small)."""


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunPython(_Args):
    code: str = Field(
        min_length=1,
        max_length=20_000,
        description="Python 3 source (standard library only). Print the answer; "
        "a JSON object printed on stdout is returned as `output`.",
    )
    datasets: tuple[Literal["orders", "refunds"], ...] = Field(
        default=(),
        max_length=2,
        description="Tenant data copied into the working directory as <name>.json",
    )


class RunCommand(_Args):
    argv: tuple[str, ...] = Field(
        min_length=1,
        max_length=32,
        description=f"Program and arguments, no shell. Programs: {', '.join(COMMANDS)}",
    )
    stdin_text: str = Field(
        default="", max_length=100_000, description="Text placed in the working directory as input.txt"
    )


def result_data(r: SandboxResult) -> dict[str, Any]:
    """The step result: exit status, resource use, and the (capped, redacted) output."""
    data: dict[str, Any] = {
        "exit_code": r.exit_code,
        "status": r.status,
        "stdout": r.stdout[:OUTPUT_CHARS],
        "stderr": r.stderr[-OUTPUT_CHARS:],
        "truncated": r.stdout_truncated or r.stderr_truncated or len(r.stdout) > OUTPUT_CHARS,
        "wall_seconds": r.wall_seconds,
        "cpu_seconds": round(r.cpu_user_seconds + r.cpu_system_seconds, 3),
        "max_rss_kb": r.max_rss_kb,
    }
    return data


def _failure(tool_name: str, r: SandboxResult) -> ToolError:
    tail = (r.stderr.strip().splitlines() or [""])[-1][:300]
    return ToolError(
        f"{tool_name} ended with {r.status} (exit {r.exit_code}, wall {r.wall_seconds:.1f} s, "
        f"cpu {r.cpu_user_seconds + r.cpu_system_seconds:.2f} s, rss {r.max_rss_kb} kB)"
        + (f": {tail}" if tail else "")
    )


async def _dataset(ctx: ToolContext, name: str) -> list[dict[str, Any]]:
    if name == "orders":
        rows = await (
            await ctx.conn.execute(
                "select o.id, o.status, o.item_sku, o.total_micros, "
                "coalesce((select sum(r.amount_micros) from refunds r "
                "          where r.order_id = o.id and r.status = 'issued'), 0)::bigint "
                "from orders o where o.tenant = %s order by o.id",
                (ctx.tenant,),
            )
        ).fetchall()
        return [
            {
                "order_id": r[0],
                "status": r[1],
                "item_sku": r[2],
                "total_usd": round(r[3] / 1e6, 2),
                "refunded_usd": round(r[4] / 1e6, 2),
            }
            for r in rows
        ]
    rows = await (
        await ctx.conn.execute(
            "select id, order_id, amount_micros, status from refunds where tenant = %s order by id",
            (ctx.tenant,),
        )
    ).fetchall()
    return [
        {"refund_id": r[0], "order_id": r[1], "amount_usd": round(r[2] / 1e6, 2), "status": r[3]}
        for r in rows
    ]


@tool(
    "run_python",
    description="Run a short Python 3 snippet in a sandbox (no network, no secrets, "
    "limited CPU, memory and time) over the tenant's data files; returns what it prints.",
    args=RunPython,
    permissions=("code:run",),
    cost_usd=0.0005,
    timeout_seconds=30,
    max_attempts=2,
    risk="medium",
    sandbox=PYTHON_SANDBOX,
)
async def run_python(ctx: ToolContext, a: RunPython) -> dict[str, Any]:
    files: dict[str, bytes | str] = {"main.py": a.code}
    for name in dict.fromkeys(a.datasets):
        files[f"{name}.json"] = json.dumps(await _dataset(ctx, name))
    r = await ctx.run([sandbox_python(), "-I", "-B", "main.py"], files=files)
    if r.status != "ok":
        raise _failure("run_python", r)
    data = result_data(r)
    text = r.stdout.strip()
    if text.startswith("{") and not r.stdout_truncated:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            data["output"] = parsed
    return data


@tool(
    "run_command",
    description="Run one allow-listed text command (no shell) in a sandbox; optional input "
    "text is the file input.txt in its working directory.",
    args=RunCommand,
    permissions=("command:run",),
    cost_usd=0.0002,
    timeout_seconds=15,
    max_attempts=2,
    risk="medium",
    sandbox=COMMAND_SANDBOX,
)
async def run_command(ctx: ToolContext, a: RunCommand) -> dict[str, Any]:
    files = {"input.txt": a.stdin_text} if a.stdin_text else None
    r = await ctx.run(list(a.argv), files=files)
    if r.status not in ("ok", "error"):
        raise _failure("run_command", r)
    return result_data(r)
