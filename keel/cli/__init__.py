"""The ``starter.py`` command line: one parser, subcommands registered by topic modules.

Each topic module (``runs``, ``budget``, ``audit``, ``dev``) exposes ``register(sub)`` that
adds its subcommands with a handler ``func(args) -> int``. Errors a user can cause are
``CliError`` and print as one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
from collections.abc import Sequence

__all__ = ["CliError", "main", "build_parser"]


class CliError(Exception):
    """A user-facing failure: printed as ``error: <message>``, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from keel.cli import audit, budget, codec, dev, runs

    parser = argparse.ArgumentParser(
        prog="starter.py",
        description="Keel: durable, budgeted, permissioned AI agents on Temporal.",
        epilog='example: python starter.py run "Is order ORD-123 shipped?" --tenant acme --user alice',
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (runs, budget, audit, dev, codec):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
        return int(result or 0)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # connection failures and the like: one line, no traceback
        from keel.cli._errors import describe

        print(f"error: {describe(e)}", file=sys.stderr)
        return 1
