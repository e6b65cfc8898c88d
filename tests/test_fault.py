"""The effect-integrity promise under faults (issue 15): a side effect happens at most once
and is either reported and compensable or did not happen, whatever dies under the runs.

36 refund + e-mail runs on one tenant whose budget affords about 60 % of them, over two
``worker.py`` processes; a worker is SIGKILLed, PostgreSQL is crashed (immediate shutdown)
and restarted, the other worker is SIGKILLed, each killed worker is replaced. The harness
and every check live in ``bench/bench_fault.py`` (the benchmark runs 150 runs over three
workers and kills the dev server too); here it runs on the session's dev server with a
PostgreSQL of its own, since the session's is shared and must not crash.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from temporalio.client import Client

from bench.bench_fault import fault_run
from keel.activities.tools.loader import catalog
from keel.devservices import DevServices, free_port
from keel.settings import Settings

RUNS, WORKERS = 36, 2


@pytest.fixture
def own_pg(temporal_services: Settings) -> Iterator[DevServices]:
    """A PostgreSQL of this test's own, in a settings object that names the session's Temporal."""
    state = Path(tempfile.mkdtemp(prefix="keel-fault-"))
    port = free_port()
    services = DevServices(
        dataclasses.replace(
            temporal_services,
            state_dir=state,
            pg_port=port,
            # The app role, as everywhere in the suite; the owner creates and migrates it.
            database_url=f"postgresql://keel_app@127.0.0.1:{port}/keel",
            database_owner_url=f"postgresql://postgres@127.0.0.1:{port}/keel",
        )
    )
    try:
        services.start_postgres()
        yield services
    finally:
        services.stop_postgres()
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.timeout(170)
async def test_every_effect_is_accounted_for_through_worker_and_database_crashes(
    client: Client, own_pg: DevServices, test_env: dict[str, str], tmp_path: Path
) -> None:
    figures = await fault_run(
        client,
        own_pg.settings,
        own_pg,
        runs=RUNS,
        workers=WORKERS,
        log_dir=tmp_path,
        base_env=test_env,
        within_s=120.0,
    )
    print("\nfault test figures:", json.dumps(figures, indent=2))  # shown with -s / on failure
    # fault_run has already checked every effect, spend, the ledger, the audit chain and the
    # run slots (it raises FaultBroken with the findings); these pin what the test exercised.
    assert figures["worker_processes"] >= WORKERS + 2, figures  # two SIGKILLed, two replaced
    assert any("PostgreSQL immediate shutdown" in f for f in figures["faults"]), figures
    assert sum(figures["outcomes"].values()) == RUNS, figures  # every run ended, each counted once
    assert figures["refused_at_admission"] >= 1, figures  # the budget is tight on purpose
    # A refusal names what the plan needs (lookup + refund + e-mail), not "$0.00".
    needs = sum(t.cost_micros for t in catalog() if t.name in ("lookup_order", "issue_refund", "send_email"))
    refusals = [r for r in figures["budget_reasons"] if "at admission" in r]
    exact = format(Decimal(needs).scaleb(-6).normalize(), "f")
    assert refusals == [f"budget refused the plan at admission (it needs ${exact})"], refusals
    assert figures["completed"] >= 1, figures
    assert figures["tool_attempts_retried"] >= 1, figures  # the faults hit steps, not gaps
