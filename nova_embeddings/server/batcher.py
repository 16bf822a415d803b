"""Dynamic batching: items of many requests share one ``encode()`` call, each request gets its own back.

One worker task (on the event loop) takes jobs from a queue until the batch reaches its token or item
budget, or ``max_wait`` has passed since it took the first, or no other request is being prepared (nothing
could join: waiting would only add latency, e.g. to every request of a single client); it then runs ``encode()`` in the
encode executor (the event loop never waits on the GPU) and slices the output back per job, in order. Up to
``max_inflight`` batches are in ``encode()`` at once: the model queues one call's GPU work at a time (its adapter
lock), so while a call waits for its vectors the next call's batches are already queued behind it, and the GPU does
not idle between calls while the host collects, hands over and prepares the next one. A job's
items arrive prepared (validated and tokenised in a preparation thread: ``model.prepare_items``); the jobs
of one call are joined with ``+``, so nothing is tokenised again on the encode thread. Jobs whose
``return_multivector`` differs share the wait but run as separate calls. If a call fails, its jobs are
retried one by one, so a bad request fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import operator
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable

from .metrics import Metrics

logger = logging.getLogger("nova_server")

EncodeFn = Callable[[Any, bool], Any]  # (prepared items of one or more jobs, return_multivector) -> vectors


class QueueFull(Exception):
    """Too many requests waiting; ``retry_after_s`` estimates when there will be room."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"queue full, retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    """The server stopped accepting requests."""


@dataclass
class Ticket:
    """A request's place in the queue while it is being prepared."""

    queued: bool = False
    released: bool = False


@dataclass(eq=False)  # a job is itself: the queue finds and drops it by identity
class Job:
    """One request's items, prepared (``model.prepare_items``: a sized object that joins with ``+``), their token
    count, and where its vectors go."""

    prepared: Any
    tokens: int
    return_multivector: bool = False
    future: asyncio.Future | None = None

    @property
    def key(self) -> bool:
        """The setting that must be uniform within one encode() call (truncation was applied when preparing)."""
        return self.return_multivector


class Batcher:
    """Queue + worker; see the module docstring. Use from the event loop only."""

    def __init__(
        self,
        encode: EncodeFn,
        executor: Executor,
        metrics: Metrics,
        *,
        max_batch_tokens: int,
        max_batch_items: int,
        max_wait_s: float,
        max_queue_requests: int,
        max_inflight: int = 1,
    ):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self._encode = encode
        self._executor = executor
        self._metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items
        self.max_wait_s = max_wait_s
        self.max_queue_requests = max_queue_requests
        self.max_inflight = max_inflight  # the executor needs as many threads
        self._pending: deque[Job] = deque()
        self._admitted = 0  # admitted requests still being prepared (not yet queued)
        self._closing = False
        self._wakeup = asyncio.Event()
        self._items_per_s = 0.0  # moving average of encode throughput, for Retry-After
        self._worker: asyncio.Task | None = None

    # ------------------------------------------------------------------ state
    @property
    def queue_requests(self) -> int:
        """Requests admitted and not yet taken into a batch."""
        return len(self._pending) + self._admitted

    @property
    def queue_items(self) -> int:
        return sum(len(job.prepared) for job in self._pending)

    @property
    def closing(self) -> bool:
        return self._closing

    # ------------------------------------------------------------------ admission
    def admit(self) -> Ticket:
        """A queue slot for a request about to be prepared; give it to ``submit``, or back with ``release``.

        Raises ShuttingDown once closing, QueueFull past ``max_queue_requests``.
        """
        if self._closing:
            raise ShuttingDown()
        if self.queue_requests >= self.max_queue_requests:
            raise QueueFull(self.retry_after_s())
        self._admitted += 1
        return Ticket()

    def release(self, ticket: Ticket) -> None:
        """Free the slot of a request that failed before it was queued (no-op once it was)."""
        if ticket.queued or ticket.released:
            return
        ticket.released = True
        self._admitted -= 1
        self._wakeup.set()  # a draining worker may be waiting for this request

    def submit(self, job: Job, ticket: Ticket) -> asyncio.Future:
        """Queue a prepared job in its ticket's slot; the future resolves to its vectors, in item order."""
        if ticket.queued or ticket.released:
            raise RuntimeError("this admission ticket was already used")
        ticket.queued = True
        self._admitted -= 1
        job.future = asyncio.get_running_loop().create_future()
        job.future.add_done_callback(functools.partial(self._drop_if_cancelled, job))
        self._pending.append(job)
        self._wakeup.set()
        return job.future

    def _drop_if_cancelled(self, job: Job, future: asyncio.Future) -> None:
        """A request cancelled while queued (its client went away) leaves the queue at once: it no longer counts
        against ``max_queue_requests`` nor takes room in a batch."""
        if future.cancelled() and job in self._pending:
            self._pending.remove(job)

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained, from the recent throughput (1 to 60)."""
        if self._items_per_s <= 0:
            return 1
        return int(min(60, max(1, math.ceil(self.queue_items / self._items_per_s))))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="nova-batcher")

    async def close(self) -> None:
        """Stop admitting; finish every admitted and queued request; then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker

    async def _run(self) -> None:
        """Collect a batch whenever fewer than ``max_inflight`` are running; at the end, wait for those."""
        slots = asyncio.Semaphore(self.max_inflight)
        running: set[asyncio.Task] = set()
        while True:
            await slots.acquire()
            batch = await self._collect()
            if batch is None:
                break
            task = asyncio.get_running_loop().create_task(self._run_in_slot(batch, slots))
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running)

    async def _run_in_slot(self, batch: list[Job], slots: asyncio.Semaphore) -> None:
        try:
            await self._run_batch(batch)
        except Exception as error:  # noqa: BLE001 - a bug here must fail these requests, not stop the worker
            logger.exception("batch failed outside encode()")
            for job in batch:
                _resolve(job, error=error)
        finally:
            slots.release()

    # ------------------------------------------------------------------ batching
    async def _collect(self) -> list[Job] | None:
        """The next batch: wait for a first job, then add jobs until a budget is full, the wait is over, or no
        admitted request is still being prepared."""
        while not self._pending:
            if self._closing and self._admitted == 0:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        batch: list[Job] = []
        tokens = items = 0
        deadline = time.monotonic() + self.max_wait_s
        while True:
            while self._pending and (not batch or self._fits(self._pending[0], tokens, items)):
                job = self._pending.popleft()
                batch.append(job)
                tokens, items = tokens + job.tokens, items + len(job.prepared)
            full = bool(self._pending) or tokens >= self.max_batch_tokens or items >= self.max_batch_items
            remaining = deadline - time.monotonic()
            if full or self._closing or remaining <= 0 or self._admitted == 0:
                return batch
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _fits(self, job: Job, tokens: int, items: int) -> bool:
        return tokens + job.tokens <= self.max_batch_tokens and items + len(job.prepared) <= self.max_batch_items

    async def _run_batch(self, batch: list[Job]) -> None:
        """One encode() call per settings group; then hand each job its slice."""
        live = [job for job in batch if not job.future.done()]  # a cancelled request costs nothing
        groups: dict[bool, list[Job]] = {}
        for job in live:
            groups.setdefault(job.key, []).append(job)
        for jobs in groups.values():
            await self._run_group(jobs)

    async def _run_group(self, jobs: list[Job]) -> None:
        prepared = functools.reduce(operator.add, (job.prepared for job in jobs))
        started = time.monotonic()
        try:
            vectors = await self._call_encode(prepared, jobs[0].return_multivector)
        except Exception as error:  # noqa: BLE001 - any failure: isolate the bad request(s), below
            if len(jobs) == 1:
                _resolve(jobs[0], error=error)
                return
            logger.info("batch of %d requests failed (%s); retrying them one by one", len(jobs), error)
            for job in jobs:
                await self._run_group([job])
            return
        seconds = time.monotonic() - started
        self._metrics.observe_batch(len(jobs), len(prepared), seconds)
        self._update_throughput(len(prepared), seconds)
        offset = 0
        for job in jobs:
            _resolve(job, result=vectors[offset : offset + len(job.prepared)])
            offset += len(job.prepared)

    async def _call_encode(self, prepared: Any, return_multivector: bool) -> Any:
        loop = asyncio.get_running_loop()
        self._metrics.encode_started()
        try:
            return await loop.run_in_executor(self._executor, self._encode, prepared, return_multivector)
        finally:
            self._metrics.encode_finished()

    def _update_throughput(self, items: int, seconds: float) -> None:
        rate = items / max(seconds, 1e-6)
        self._items_per_s = rate if self._items_per_s == 0 else 0.8 * self._items_per_s + 0.2 * rate


def _resolve(job: Job, result: Any = None, error: BaseException | None = None) -> None:
    if job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(result)
