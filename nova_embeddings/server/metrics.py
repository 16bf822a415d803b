"""Counters for /metrics in Prometheus' text format (written by hand: one dependency less).

Updated from the event loop only (the batcher's worker runs there too), so no locks are needed.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

BATCH_ITEM_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class Histogram:
    """Cumulative-bucket histogram."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound:g}"}} {n}' for bound, n in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:g}", f"{name}_count {self.count}"]
        return out


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted list (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Metrics:
    """What /metrics reports; latencies are kept for the last ``window`` embedding requests."""

    window: int = 4096
    http: Counter = field(default_factory=Counter)  # (path, status) -> responses
    items: int = 0
    tokens: int = 0
    batches: int = 0
    encode_seconds: float = 0.0  # every batch's time in encode(), summed (batches in flight together overlap)
    encode_busy_seconds: float = 0.0  # time with at least one batch in encode(), up to the last batch that ended
    encoding: int = 0  # batches in encode() now
    busy_since: float = 0.0
    max_batch_requests: int = 0
    batch_items: Histogram = field(default_factory=lambda: Histogram(BATCH_ITEM_BUCKETS))
    batch_requests: Histogram = field(default_factory=lambda: Histogram(BATCH_REQUEST_BUCKETS))
    latencies: deque = field(default_factory=deque)
    latency_sum: float = 0.0
    latency_count: int = 0

    def observe_http(self, path: str, status: int) -> None:
        self.http[(path, status)] += 1

    def observe_embedding(self, items: int, tokens: int, seconds: float) -> None:
        """One successful embedding request."""
        self.items += items
        self.tokens += tokens
        self.latency_sum += seconds
        self.latency_count += 1
        self.latencies.append(seconds)
        if len(self.latencies) > self.window:
            self.latencies.popleft()

    def encode_started(self) -> None:
        if self.encoding == 0:
            self.busy_since = time.monotonic()
        self.encoding += 1

    def encode_finished(self) -> None:
        self.encoding -= 1
        if self.encoding == 0:
            self.encode_busy_seconds += time.monotonic() - self.busy_since

    def busy_seconds(self) -> float:
        """Seconds with at least one batch in encode(), the running stretch included (a counter: never goes down)."""
        running = time.monotonic() - self.busy_since if self.encoding else 0.0
        return self.encode_busy_seconds + running

    def observe_batch(self, requests: int, items: int, seconds: float) -> None:
        """One encode() call of the batcher."""
        self.batches += 1
        self.encode_seconds += seconds
        self.max_batch_requests = max(self.max_batch_requests, requests)
        self.batch_items.observe(items)
        self.batch_requests.observe(requests)

    def render(self, queue_requests: int, queue_items: int, adapters: list[str], ready: bool) -> str:
        """The Prometheus text exposition."""
        lines = ["# TYPE nova_http_responses_total counter"]
        lines += [f'nova_http_responses_total{{path="{path}",status="{status}"}} {n}'
                  for (path, status), n in sorted(self.http.items())]
        lines += [
            "# TYPE nova_items_total counter", f"nova_items_total {self.items}",
            "# TYPE nova_tokens_total counter", f"nova_tokens_total {self.tokens}",
            "# TYPE nova_batches_total counter", f"nova_batches_total {self.batches}",
            "# TYPE nova_encode_seconds_total counter", f"nova_encode_seconds_total {self.encode_seconds:g}",
            "# TYPE nova_encode_busy_seconds_total counter",
            f"nova_encode_busy_seconds_total {self.busy_seconds():g}",
            "# TYPE nova_queue_requests gauge", f"nova_queue_requests {queue_requests}",
            "# TYPE nova_queue_items gauge", f"nova_queue_items {queue_items}",
            "# TYPE nova_ready gauge", f"nova_ready {int(ready)}",
            "# TYPE nova_adapters_loaded gauge", f"nova_adapters_loaded {len(adapters)}",
            "# TYPE nova_batch_items histogram", *self.batch_items.lines("nova_batch_items"),
            "# TYPE nova_batch_requests histogram", *self.batch_requests.lines("nova_batch_requests"),
            "# TYPE nova_request_latency_seconds summary",
        ]
        ordered = sorted(self.latencies)
        lines += [f'nova_request_latency_seconds{{quantile="{q:g}"}} {quantile(ordered, q):g}' for q in QUANTILES]
        lines += [f"nova_request_latency_seconds_sum {self.latency_sum:g}",
                  f"nova_request_latency_seconds_count {self.latency_count}"]
        return "\n".join(lines) + "\n"
