"""Keel: durable, budgeted, permissioned AI agents on Temporal.

``keel.Client`` (start and steer runs) and ``keel.Agent`` (declare an agent) are the public
entry points; they are imported on first use so ``import keel`` (and ``keel --help``) stays
fast, and so that importing any module of the core (``keel.gate`` from a workflow, say), which
runs this file first, loads nothing else: this file is the public face, above every room of
the layering (README "Layering"), and only ``keel.cli`` imports it (for ``__version__``).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Agent", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from keel.client import Client

        return Client
    if name == "Agent":
        from keel.agents import Agent

        return Agent
    raise AttributeError(f"module 'keel' has no attribute {name!r}")
