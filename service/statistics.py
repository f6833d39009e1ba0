"""Per model-version accounting: the one source for ModelStatistics and metrics.

Counts follow Triton's definitions so that perf_analyzer's server-side
breakdown is right: `success`, `queue` and `compute_*` count successful
requests and their cumulative nanoseconds; `fail` counts failed requests;
`inference_count` counts rows (batch elements) and `execution_count` counts
model executions. Recording happens on the event loop or in worker threads,
reading happens in RPC handlers and the metrics thread, hence the lock.
"""

from __future__ import annotations

import bisect
import copy
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

# Histogram bucket upper bounds (Prometheus `le`); +Inf is implied.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PADDING_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


@dataclass
class Histogram:
    """Counts per bucket (not cumulative; the last counts values above every bound)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), +Inf last: Prometheus' buckets."""
        running = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(ns, 0)


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class RequestTimings:
    """Where one request's time went, in nanoseconds."""

    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    # Set once onnxruntime was called for this request, whatever the outcome.
    executed: bool = False


@dataclass
class StatsSnapshot:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchDurations] = field(default_factory=dict)
    failures_by_status: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    input_elements: int = 0  # fed to the model, padding included
    padded_elements: int = 0
    # Distributions for the metrics endpoint (kept only while metrics are on).
    request_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    queue_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    compute_input_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    compute_infer_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    compute_output_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))
    padding_ratio: Histogram = field(default_factory=lambda: Histogram(PADDING_BUCKETS))


class ModelStats:
    """Thread-safe accumulator for one model version.

    `histograms` off skips the distributions (a few bisects per request) when
    nothing will ever scrape them; the counts ModelStatistics needs are always kept.
    """

    def __init__(self, histograms: bool = True) -> None:
        self._lock = threading.Lock()
        self._data = StatsSnapshot()
        self._histograms = histograms

    def request_started(self) -> None:
        with self._lock:
            self._data.in_flight += 1

    def record_execution(
        self, batch_size: int, timings: RequestTimings, elements: int = 0, padded: int = 0
    ) -> None:
        with self._lock:
            data = self._data
            data.execution_count += 1
            data.input_elements += elements
            data.padded_elements += padded
            if self._histograms:
                data.batch_size.observe(batch_size)
                if elements:
                    data.padding_ratio.observe(padded / elements)
            batch = data.batches.setdefault(batch_size, BatchDurations())
            batch.compute_input.add(timings.compute_input_ns)
            batch.compute_infer.add(timings.compute_infer_ns)
            batch.compute_output.add(timings.compute_output_ns)

    def record_success(self, rows: int, total_ns: int, timings: RequestTimings) -> None:
        """A request started with request_started() succeeded."""
        with self._lock:
            data = self._data
            data.in_flight -= 1
            data.success.add(total_ns)
            data.queue.add(timings.queue_ns)
            data.compute_input.add(timings.compute_input_ns)
            data.compute_infer.add(timings.compute_infer_ns)
            data.compute_output.add(timings.compute_output_ns)
            data.inference_count += rows
            data.last_inference_ms = time.time_ns() // 1_000_000
            if self._histograms:
                data.request_seconds.observe(total_ns / 1e9)
                data.queue_seconds.observe(timings.queue_ns / 1e9)
                data.compute_input_seconds.observe(timings.compute_input_ns / 1e9)
                data.compute_infer_seconds.observe(timings.compute_infer_ns / 1e9)
                data.compute_output_seconds.observe(timings.compute_output_ns / 1e9)

    def record_failure(self, total_ns: int, status: str, started: bool = True) -> None:
        """A request failed; `started` says whether request_started() counted it in flight."""
        with self._lock:
            if started:
                self._data.in_flight -= 1
            self._data.fail.add(total_ns)
            self._data.failures_by_status[status] += 1
            self._data.last_inference_ms = time.time_ns() // 1_000_000

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return copy.deepcopy(self._data)
