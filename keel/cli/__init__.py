"""The ``keel`` command line: one parser, subcommands registered by topic modules.

Each topic module (``runs``, ``budget``, ``audit``, ``dev``, ``codec``, ``tools``, ``agents``) exposes
``register(sub)`` that adds its subcommands with a handler ``func(args) -> int``. Errors a
user can cause are ``CliError`` and print as one line on stderr with a non-zero exit, never
a traceback.

Fast help: the topic modules import Temporal, psycopg and pydantic (~1 s). ``keel --help``
(and ``keel`` with no or an unknown command) needs none of that, so it is answered from
``COMMANDS``, a table of names and one-line helps; only the module owning the chosen
command is imported. ``tests/test_cli_entry.py`` keeps the table equal to what the modules
register. ``bench/bench_cli.py`` measures it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from keel.errors import KeelError

__all__ = ["COMMANDS", "CliError", "build_parser", "entry", "main"]

PROG = "keel"

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("runs", "start an agent run and print its result"),
    "status": ("runs", "show a run's live plan, steps and spend"),
    "list": ("runs", "list recent runs"),
    "approve": ("runs", "approve (or --reject) a step waiting for a human"),
    "cancel": ("runs", "cancel a run; its side effects are compensated"),
    "approvals": ("steer", "list every step waiting for a person, across runs"),
    "retry": ("steer", "run a stopped or failed request again, reusing its recorded effects"),
    "doctor": ("doctor", "check services, workers, migrations, search attributes, policy and prices"),
    "breakers": ("ops", "show circuit-breaker state per tool and model provider"),
    "budget": ("budget", "budget ledger: limits, spend, reservations"),
    "audit": ("audit", "verify the tamper-evident audit log or show a run's trail"),
    "dev": ("dev", "start, stop or inspect the embedded Temporal + PostgreSQL"),
    "codec-server": (
        "codec",
        "serve Temporal's codec protocol so the Web UI and CLI show decrypted payloads",
    ),
    "codec-key": ("codec", "list payload keys, or add a new newest key (rotation)"),
    "tools": ("tools", "list the tools a worker would load, and from where"),
    "agents": ("agents", "list the agent definitions a worker would serve"),
    "completion": ("completion", "print a shell completion script (bash, zsh)"),
}
"""Every command: the ``keel.cli`` module that registers it, and its one-line help."""

_DESCRIPTION = "Keel: durable, budgeted, permissioned AI agents on Temporal."
_EPILOG = (
    'example: keel run "Is order ORD-123 shipped?" --tenant acme --user alice\n'
    "         keel COMMAND --help      (every command has examples)\n"
    '         eval "$(keel completion bash)"   (tab completion)'
)


class CliError(KeelError):
    """A user-facing failure: printed as ``error: <message>``, exit status 2."""


def _version() -> str:
    from keel import __version__

    return __version__


def _root() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:  # type: ignore[type-arg]
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"keel {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    return parser, sub


def build_parser(command: str | None = None, *, light: bool = False) -> argparse.ArgumentParser:
    """The parser; with ``command``, only the module owning it is imported (others are stubs).

    ``command=None`` registers every module (the full parser: tests, completion scripts);
    ``light=True`` imports none (top-level help and usage errors).
    """
    import importlib

    parser, sub = _root()
    if light:
        wanted: set[str] = set()
    elif command is None:
        wanted = {m for m, _ in COMMANDS.values()}
    else:
        wanted = {COMMANDS[command][0]}
    for module in dict.fromkeys(m for m, _ in COMMANDS.values()):
        owned = [n for n, (m, _) in COMMANDS.items() if m == module]
        if module in wanted and not all(n in sub.choices for n in owned):  # runs also adds ops
            importlib.import_module(f"keel.cli.{module}").register(sub)
    for name, (_, help_) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_, add_help=False)
    # Commands listed in the table's order, whatever order the modules registered them in.
    actions = {a.dest: a for a in sub._choices_actions}
    sub._choices_actions[:] = [actions[n] for n in COMMANDS if n in actions] + [
        a for n, a in actions.items() if n not in COMMANDS
    ]
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if known."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # ``| head`` closed the pipe: stop quietly, as ``cat`` would. Point stdout at
        # /dev/null so the interpreter's final flush cannot raise again.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = _command_of(argv)
        parser = build_parser(command, light=command is None)
    except Exception as e:  # a command module that cannot import (broken install)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)  # help, --version and bad usage exit here
    if not hasattr(args, "func"):  # pragma: no cover - stubs only exist for unchosen commands
        parser.print_help(sys.stderr)
        return 2
    from keel.settings import SettingsError, apply_dotenv, load_settings

    try:
        apply_dotenv()
        load_settings()  # every problem at once, before any command acts on half a config
    except SettingsError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    try:
        if hasattr(args, "json"):
            from keel.cli._output import fmt

            args.output = fmt(args)  # -o table|json|jsonl; --json is -o json
            args.json = args.output != "table"
            args.output_resolved = True
        result = args.func(args)
        import inspect

        if inspect.isawaitable(result):
            import asyncio

            result = asyncio.run(result)
        return int(result or 0)
    except BrokenPipeError:
        raise
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


def entry() -> None:
    """The ``keel`` console script (and ``starter.py``): run ``main`` and leave at once.

    temporalio/sdk-python#300: the SDK's runtime threads can abort interpreter shutdown
    ("PyGILState_Release"); everything is flushed and closed by then, so ``os._exit``.
    """
    import os

    try:
        code = main()
    except SystemExit as e:  # argparse: help, --version, usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
