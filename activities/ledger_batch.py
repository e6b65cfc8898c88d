"""One worker's ledger calls, coalesced into shared transactions.

Every reservation and commit of a tenant updates that tenant's scope row, and a row lock is
held until the transaction's commit record is flushed. One operation per transaction
therefore caps a hot tenant at one WAL flush per operation, whatever the hardware does in
parallel. The batcher lifts that cap without weakening anything: the reserve, commit and
release calls that are waiting at the same moment in one worker process (its concurrent
local activities) go to ``keel_budget_batch`` as ONE transaction: one round trip, one flush,
one tenant-row lock for the lot. The database runs them one after another, exactly as if
they had arrived alone, and each caller gets its own answer or its own refusal.

No call waits for company: a call that finds no batch in flight goes out at once, alone,
through the single-operation function (the lowest-latency path). Both kinds of transaction go
through the ledger client's one way to call (``ledger.execute``: psycopg's server-side
prepared statements, one round trip). Calls that arrive while
``max_in_flight`` batches are out wait for the next one, so batches grow only as far as the
load makes them. If a batch fails as a whole (a malformed scope, a deadlock, a dropped
connection) its operations are re-run one by one, which is safe because every operation is
idempotent by key and payload: the failed batch either committed entirely or not at all.

Holds are leases (``lease_holds``, ``KEEL_LEDGER_HOLDS=lease`` by default): a transaction
holding only reservations commits without waiting for its WAL flush, so a lone reservation does
not pay for the disk; any transaction with a commit or release waits. The ledger's SQL
(``keel/migrations/baseline/ledger.sql``) says what a PostgreSQL crash can then cost (holds,
never spend) and how a commit records a lost hold.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from keel.activities import ledger
from keel.budget import (
    CommitRequest,
    CommitResult,
    ReleaseRequest,
    ReleaseResult,
    ReserveRequest,
    ReserveResult,
)

__all__ = ["LedgerBatcher"]

_R = TypeVar("_R", bound=BaseModel)
_Pending = tuple[dict[str, Any], "asyncio.Future[dict[str, Any]]"]


class LedgerBatcher:
    """Reserve / commit / release through shared transactions (see the module docstring).

    ``max_batch`` bounds one transaction's work (and so how long it holds the tenant row);
    ``max_in_flight`` is how many batches may be out at once: 2 lets the next batch travel
    and queue while the previous one flushes. With ``lease_holds`` (``KEEL_LEDGER_HOLDS=lease``,
    the default) a transaction holding only reservations commits without waiting for its WAL
    flush; any transaction with a commit or release waits (``baseline/ledger.sql`` says why
    that is safe and what a database crash can cost). ``pool`` is best a ledger-only pool of
    ``max_in_flight`` connections (``keel.db.open_ledger_pool``, what the worker gives it).
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        max_batch: int = 64,
        max_in_flight: int = 2,
        lease_holds: bool = True,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be >= 1")
        self._pool = pool
        self._lease_holds = lease_holds
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: list[_Pending] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        """Transactions sent (for tests and benchmarks: ``operations / batches`` = batch size)."""
        self.operations = 0

    async def reserve(self, req: ReserveRequest) -> ReserveResult:
        return await self._call(req, ReserveResult)

    async def commit(self, req: CommitRequest) -> CommitResult:
        return await self._call(req, CommitResult)

    async def release(self, req: ReleaseRequest) -> ReleaseResult:
        return await self._call(req, ReleaseResult)

    async def _call(self, req: ReserveRequest | CommitRequest | ReleaseRequest, out: type[_R]) -> _R:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((ledger.batch_op(req), fut))
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # A cancelled caller does not cancel the batch: its operation may still be applied,
        # and the caller's retry (same key) gets that answer back.
        answer = await fut
        error = ledger.answer_error(answer)
        if error is not None:
            raise error
        return out.model_validate(answer)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._flush(batch)
        finally:
            self._in_flight -= 1

    async def _flush(self, batch: list[_Pending]) -> None:
        self.batches += 1
        self.operations += len(batch)
        try:
            answers = await self._execute([op for op, _ in batch])
        except Exception as e:  # the whole transaction failed: isolate by re-running singly
            if len(batch) == 1:
                _settle(batch[0][1], error=e)
                return
            for op, fut in batch:
                try:
                    (answer,) = await self._execute([op])
                except Exception as single:
                    _settle(fut, error=single)
                else:
                    _settle(fut, answer=answer)
            return
        for (_, fut), answer in zip(batch, answers, strict=True):
            _settle(fut, answer=answer)

    async def _execute(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run ``ops`` in one transaction; a lone op uses its single-operation function.
        Both are prepared statements (``ledger.execute``): this is the hot path."""
        lease = self._lease_holds and all(op["op"] == "reserve" for op in ops)
        async with self._pool.connection() as conn:
            if len(ops) == 1:
                return [await ledger.run_op(conn, ops[0], lease=lease)]
            return await ledger.run_batch(conn, ops, lease=lease)


def _settle(
    fut: asyncio.Future[dict[str, Any]],
    *,
    answer: dict[str, Any] | None = None,
    error: Exception | None = None,
) -> None:
    if fut.done():  # the caller was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        assert answer is not None
        fut.set_result(answer)
