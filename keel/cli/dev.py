"""``dev up|down|status``: the embedded Temporal + PostgreSQL (the one-machine default)."""

from __future__ import annotations

import argparse
import json

from keel.cli import CliError
from keel.devservices import DevServices, ServiceError
from keel.settings import load_settings

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dev",
        help="start, stop or inspect the embedded Temporal + PostgreSQL",
        description="Control the embedded services of the one-machine default: the Temporal "
        "dev server and PostgreSQL, both from PyPI (state in .keel/ or "
        "KEEL_STATE_DIR). Starting twice reuses what runs.",
        epilog="examples:\n  starter.py dev up --workers 2   # services and two workers\n"
        "  starter.py dev status --json\n  starter.py dev down",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=["up", "down", "status"], help="what to do")
    p.add_argument(
        "--workers", type=int, default=0, help="with 'up': also keep this many worker processes running"
    )
    p.add_argument("--json", action="store_true", help="print the services' status as JSON")
    p.set_defaults(func=_dev)


def _dev(args: argparse.Namespace) -> int:
    services = DevServices(load_settings())
    try:
        if args.action == "up":
            services.up()
            if args.workers < 0:
                raise CliError("--workers must be 0 or more")
            if args.workers:
                services.start_workers(args.workers)
        elif args.action == "down":
            services.down()
    except ServiceError as e:
        raise CliError(str(e)) from None
    st = services.status()
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        for k, v in st.items():
            print(f"{k:<9} {v}")
    return 0
