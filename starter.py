"""The Keel command line: run agents, inspect runs, manage budgets, audit, dev services.

    python starter.py --help
"""

import sys

from keel.cli import main

if __name__ == "__main__":
    sys.exit(main())
