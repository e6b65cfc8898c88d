"""The Keel command line: run agents, inspect runs, manage budgets, audit, dev services.

python starter.py --help
"""

import os
import sys

from keel.cli import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # temporalio/sdk-python#300: the SDK's runtime threads can abort interpreter shutdown
    # ("PyGILState_Release"); everything is flushed and closed, so leave at once.
    os._exit(code)
