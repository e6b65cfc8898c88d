"""``agents list``: the agent definitions a worker would serve (see ``keel.agents``)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "agents",
        help="list the agent definitions a worker would serve",
        description="Show the agent definitions a worker started with this environment would serve.",
    )
    p.set_defaults(func=lambda args: 0)
