"""Three stages per chunk of rows, overlapped so the GPU does not wait on the CPU: prepare -> encode -> write.

``prepare`` (read the rows, ``model.prepare_items``: validate, decode images, tokenise) runs in worker threads
for the next chunks while this thread runs ``encode`` (the GPU) on the current one; a writer thread converts
and writes the previous one. Chunks leave each stage in input order. At most ``ahead`` chunks are prepared
ahead and at most ``ahead`` encoded chunks wait for the writer, so memory stays bounded. The first error of
any stage stops the run and is raised in the calling thread: no new chunk is prepared or encoded, the chunk
being prepared finishes, and the chunks already encoded are written (unless the writer failed).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from itertools import islice
from typing import Callable, Iterable, TypeVar

Chunk = TypeVar("Chunk")
Prepared = TypeVar("Prepared")
Encoded = TypeVar("Encoded")


@dataclass
class StageTimes:
    """Seconds per stage of one run. Busy times of worker stages are summed over their threads and overlap
    the GPU stage; ``wait_*`` are the encode stage's (the GPU's) idle times; ``wall`` is the whole loop."""

    setup: float = 0.0  # scan, model load, plan (before the loop)
    read: float = 0.0
    prepare: float = 0.0
    encode: float = 0.0
    write: float = 0.0
    wait_for_input: float = 0.0  # encode stage waiting for a prepared chunk (includes the first one)
    wait_for_writer: float = 0.0  # encode stage waiting for a write slot, and for the last writes at the end
    wall: float = 0.0
    rows: int = 0
    chunks: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, stage: str, amount: float) -> None:
        """Add to a field (several threads add to the same ones)."""
        with self._lock:
            setattr(self, stage, getattr(self, stage) + amount)

    def summary(self) -> str:
        """One line: rate, the encode stage's share, and where the rest went."""
        rate = self.rows / self.wall if self.wall else 0.0
        return (f"{self.rows} rows in {self.wall:.2f} s ({rate:.1f} rows/s, {self.chunks} chunks): encode (GPU stage) "
                f"{self.encode:.2f} s, idle waiting for prepared rows {self.wait_for_input:.2f} s, waiting for the writer "
                f"{self.wait_for_writer:.2f} s; beside it: read {self.read:.2f} s, prepare {self.prepare:.2f} s, "
                f"write {self.write:.2f} s; setup before the loop {self.setup:.2f} s")

    def as_dict(self) -> dict[str, float]:
        return {item.name: getattr(self, item.name) for item in fields(self) if not item.name.startswith("_")}


def run_pipeline(
    chunks: Iterable[Chunk],
    prepare: Callable[[Chunk], Prepared],
    encode: Callable[[Prepared], Encoded],
    write: Callable[[Encoded], None],
    *,
    ahead: int,
    times: StageTimes,
) -> None:
    """Every chunk through ``write(encode(prepare(chunk)))``, in order; ``encode`` runs in this thread.

    ``ahead`` > 0: up to ``ahead`` chunks are prepared concurrently (``ahead`` threads) while the current one
    is encoded, and up to ``ahead`` encoded chunks wait for the writer thread. ``ahead`` = 0: one stage after
    another, no threads.
    """
    start = time.perf_counter()
    try:
        if ahead < 0:
            raise ValueError(f"ahead must be 0 or more, got {ahead}")
        if ahead == 0:
            for chunk in chunks:
                write(timed(times, "encode", encode, prepare(chunk)))
        else:
            run_overlapped(iter(chunks), prepare, encode, write, ahead, times)
    finally:
        times.add("wall", time.perf_counter() - start)


def run_overlapped(chunks, prepare, encode, write, ahead: int, times: StageTimes) -> None:
    """``run_pipeline`` with threads. After an error no new chunk is prepared or encoded; the chunk being prepared
    finishes, and chunks already encoded are still written unless the error was the writer's."""
    preparer = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="corpus-prepare")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corpus-write")  # one thread: writes stay in order
    write_failed = threading.Event()

    def write_in_order(encoded) -> None:
        if write_failed.is_set():
            return  # an earlier chunk was not written: writing later ones would leave a hole
        try:
            write(encoded)
        except BaseException:
            write_failed.set()
            raise

    try:
        prepared: deque[Future] = deque(preparer.submit(prepare, chunk) for chunk in islice(chunks, ahead))
        written: deque[Future] = deque()
        while prepared:
            ready = timed(times, "wait_for_input", prepared.popleft().result)  # re-raises a preparer's error
            for chunk in islice(chunks, 1):
                prepared.append(preparer.submit(prepare, chunk))
            written.append(writer.submit(write_in_order, timed(times, "encode", encode, ready)))
            while written and (len(written) > ahead or written[0].done()):
                timed(times, "wait_for_writer", written.popleft().result)  # re-raises a writer's error
        while written:
            timed(times, "wait_for_writer", written.popleft().result)
    finally:
        preparer.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)


def timed(times: StageTimes, stage: str, function: Callable, *args):
    """``function(*args)``, its seconds added to ``times.<stage>`` (also when it raises)."""
    start = time.perf_counter()
    try:
        return function(*args)
    finally:
        times.add(stage, time.perf_counter() - start)


__all__ = ["StageTimes", "run_pipeline", "timed"]
