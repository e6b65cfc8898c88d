"""Timeouts and retry policies of every activity the agent workflow schedules, each with its
reason. One place, so the workflow's modules cannot drift apart on them."""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy

from keel.errors import AUTH_ERROR, BAD_REQUEST, IDEMPOTENCY_CONFLICT, INVALID_PLAN

__all__ = [
    "COMPENSATION_RETRY",
    "COMPENSATION_TIMEOUT",
    "CONTROL_RETRY",
    "LOCAL_BEGIN_RETRY",
    "CONTROL_TIMEOUT",
    "FENCE_RETRY",
    "FINISH_LOCAL_TIMEOUT",
    "FINISH_RETRY",
    "MODEL_HEARTBEAT",
    "MODEL_RETRY",
    "MODEL_TIMEOUT",
    "PREPARE_TIMEOUT",
    "TOOL_HEARTBEAT",
]

PREPARE_TIMEOUT = timedelta(seconds=30)  # reads a file and a few rows; slow means broken
FINISH_LOCAL_TIMEOUT = timedelta(seconds=30)  # a finish without a model call: a few rows
MODEL_TIMEOUT = timedelta(minutes=3)  # long completions; the activity heartbeats
MODEL_HEARTBEAT = timedelta(seconds=30)  # a dead worker is noticed within half a minute
CONTROL_TIMEOUT = timedelta(seconds=10)  # ledger/audit calls are single round trips
MODEL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
    non_retryable_error_types=[AUTH_ERROR, BAD_REQUEST, INVALID_PLAN],
)
CONTROL_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=50),
    maximum_attempts=10,
    maximum_interval=timedelta(seconds=2),
    non_retryable_error_types=[IDEMPOTENCY_CONFLICT],
)
LOCAL_BEGIN_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=50),
    maximum_attempts=10,
    maximum_interval=timedelta(seconds=2),
    non_retryable_error_types=[IDEMPOTENCY_CONFLICT, AUTH_ERROR, BAD_REQUEST, INVALID_PLAN],
)  # begin_local: the preparation's retries (CONTROL_RETRY) and the plan's permanent errors
FENCE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=50),
    maximum_attempts=0,
    maximum_interval=timedelta(seconds=2),
    non_retryable_error_types=[IDEMPOTENCY_CONFLICT],
)  # the durable record decides a failing step: until the database answers, wait for it
FINISH_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_attempts=0, maximum_interval=timedelta(seconds=30)
)  # the ending must happen (finish row, memory, run slot): wait out a database outage
COMPENSATION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_attempts=0, maximum_interval=timedelta(seconds=30)
)  # must eventually undo
TOOL_HEARTBEAT = timedelta(seconds=4)  # tools beat every second; a killed worker is seen in 4 s
COMPENSATION_TIMEOUT = timedelta(seconds=30)  # one undo is one short transaction
