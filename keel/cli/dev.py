"""``dev up|down|status``: the embedded Temporal + PostgreSQL (the one-machine default)."""

from __future__ import annotations

import argparse
import asyncio
import time

from keel.cli._output import CliError, add_output, emit_json, fmt, print_table
from keel.devservices import DevServices, ServiceError
from keel.settings import Settings, load_settings

__all__ = ["register"]

WORKER_READY_TIMEOUT = 60.0
"""How long ``dev up`` waits for its workers to poll (imports, migrations, connect: ~5 s)."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dev",
        help="start, stop or inspect the embedded Temporal + PostgreSQL",
        description="Control the embedded services of the one-machine default: the Temporal "
        "dev server and PostgreSQL, both from PyPI (state in .keel/ or "
        "KEEL_STATE_DIR), and detached workers. Starting twice reuses what runs.",
        epilog="examples:\n  starter.py dev up               # services and one worker\n"
        "  starter.py dev up --workers 2   # services and two workers\n"
        "  starter.py dev status -o json   # exit status 1 if anything is down\n"
        "  starter.py dev down",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=["up", "down", "status"], help="what to do")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="with 'up': keep this many worker processes running (default 1; 0 for none)",
    )
    add_output(p)
    p.set_defaults(func=_dev)


def _dev(args: argparse.Namespace) -> int:
    output = fmt(args)
    settings = load_settings()
    services = DevServices(settings)
    try:
        if args.action == "up":
            if args.workers < 0:
                raise CliError("--workers must be 0 or more")
            services.up()
            if args.workers:
                services.start_workers(args.workers)
                asyncio.run(_wait_for_workers(settings, services))
        elif args.action == "down":
            services.down()
    except ServiceError as e:
        raise CliError(str(e)) from None
    st = services.status()
    polling = asyncio.run(_polling(settings)) if services.temporal_running() else None
    if polling is not None:
        st["workers"] += f", {polling} polling task queue {settings.task_queue}"
    down = [k for k in ("temporal", "postgres") if st[k] == "stopped"]
    if not polling:
        down.append("workers")
    if output != "table":
        emit_json({**st, "down": down}, output)
    else:
        print_table(["service", "state"], list(st.items()))
    if args.action == "down":
        return 0
    return 1 if down else 0


async def _polling(settings: Settings) -> int:
    """How many workers (ours or anyone's) poll the main queue; 0 if Temporal cannot say."""
    from keel.client import connect
    from keel.doctor import queue_pollers

    try:
        client = await asyncio.wait_for(connect(settings), timeout=5)
        return len(await queue_pollers(client, settings.temporal_namespace, settings.task_queue))
    except Exception:
        return 0


async def _wait_for_workers(settings: Settings, services: DevServices) -> None:
    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    while time.monotonic() < deadline:
        if await _polling(settings):
            return
        if not services.worker_pids():
            break
        await asyncio.sleep(0.5)
    logs = sorted(settings.state_dir.glob("worker-*.log"))
    raise CliError(
        f"the worker did not start polling task queue {settings.task_queue}"
        + (f" — see {logs[-1]}" if logs else "")
    )
