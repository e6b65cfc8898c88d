"""The Keel command line (also installed as ``keel``): run agents, inspect runs, budgets, audit.

python starter.py --help        # same as: keel --help
"""

from keel.cli import entry  # flushes, then os._exit (temporalio/sdk-python#300)

if __name__ == "__main__":
    entry()
