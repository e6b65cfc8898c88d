"""History size: events and bytes of workflow history per agent step and for a long run.

Temporal refuses a run whose history passes 51,200 events or 50 MB (and warns at 10,240
events / 10 MB); single payloads are limited to 2 MB. Keel keeps large content in
PostgreSQL and only references and short summaries in history; this measures how far a run
stays from those limits: per-step cost from N=1 vs N=10 noop runs, a 200-step run, the
largest single event, and the demo 3-tool task through the real (offline) planner.
"""

from __future__ import annotations

import uuid
from typing import Any

__all__ = ["BYTES_LIMIT", "EVENT_LIMIT", "run"]

EVENT_LIMIT = 51_200
BYTES_LIMIT = 50 * 1024 * 1024
PAYLOAD_LIMIT = 2 * 1024 * 1024


async def _largest_event(client: Any, wid: str) -> tuple[int, str]:
    from temporalio.api.enums.v1 import EventType

    hist = await client.get_workflow_handle(wid).fetch_history()
    biggest = max(hist.events, key=lambda e: e.ByteSize())
    return biggest.ByteSize(), EventType.Name(biggest.event_type).removeprefix("EVENT_TYPE_")


async def run(client: Any, pool: Any, settings: Any, *, smoke: bool = False) -> dict[str, Any]:
    from bench.common import demo_request, history_size, keel_worker, noop_request, run_keel

    long_steps = 20 if smoke else 200
    tq = f"bench-history-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {
        "limits": {"events": EVENT_LIMIT, "bytes": BYTES_LIMIT, "payload_bytes": PAYLOAD_LIMIT}
    }
    async with keel_worker(client, pool, settings, tq):
        sizes: dict[int, tuple[int, int]] = {}
        for n in (1, 10, long_steps):
            resp, secs, wid = await run_keel(client, tq, noop_request(n))
            if resp.outcome != "completed" or len(resp.steps) != n:
                raise RuntimeError(f"{n}-step run ended {resp.outcome}: {resp.reason}")
            sizes[n] = await history_size(client, wid)
            if n == long_steps:
                big_event = await _largest_event(client, wid)
                out["long_run"] = {
                    "steps": n,
                    "events": sizes[n][0],
                    "bytes": sizes[n][1],
                    "wall_s": round(secs, 2),
                    "largest_event_bytes": big_event[0],
                    "largest_event_type": big_event[1],
                }
        ev_step = (sizes[10][0] - sizes[1][0]) / 9
        by_step = (sizes[10][1] - sizes[1][1]) / 9
        out["per_step"] = {"events": round(ev_step, 2), "bytes": round(by_step)}
        out["fixed"] = {"events": round(sizes[1][0] - ev_step), "bytes": round(sizes[1][1] - by_step)}
        lr = out["long_run"]
        # Growth is not linear in N: evaluate/finish inputs and the response carry every
        # step record, so project from the long run's own average too.
        avg_bytes = (lr["bytes"] - out["fixed"]["bytes"]) / long_steps
        out["projection"] = {
            "steps_to_event_limit": int((EVENT_LIMIT - out["fixed"]["events"]) / ev_step),
            "steps_to_byte_limit": int((BYTES_LIMIT - out["fixed"]["bytes"]) / max(avg_bytes, 1)),
            "long_run_share_of_event_limit_pct": round(100 * lr["events"] / EVENT_LIMIT, 2),
            "long_run_share_of_byte_limit_pct": round(100 * lr["bytes"] / BYTES_LIMIT, 3),
        }
        # The demo task through the real offline planner and real tools.
        resp, secs, wid = await run_keel(client, tq, await demo_request(pool))
        events, size = await history_size(client, wid)
        out["demo_task"] = {
            "outcome": resp.outcome,
            "tools": [s.tool for s in resp.steps],
            "events": events,
            "bytes": size,
            "wall_ms": round(secs * 1000, 1),
        }
    return out
