"""Run one Keel worker against the services named by the environment (see keel.settings).

python worker.py            # start as many as you like, on as many hosts as you like
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from keel.activities.tools.loader import ToolLoadError
from keel.agents import AgentError
from keel.settings import SettingsError, apply_dotenv, load_settings
from keel.worker import run_worker


async def _main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_worker(load_settings(), stop=stop)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        apply_dotenv()
        load_settings()
    except SettingsError as e:  # every bad variable, one line each, before anything starts
        for line in e.problems:
            print(f"worker: {line}", file=sys.stderr)
        sys.exit(2)
    try:
        asyncio.run(_main())
    except Exception as e:  # one line for people; the log has the rest
        first = str(e).splitlines()[0] if str(e) else ""
        plain = isinstance(e, ToolLoadError | AgentError)  # their message names the culprit
        print(f"worker: {first}" if plain else f"worker: {type(e).__name__}: {first}", file=sys.stderr)
        sys.exit(1)
