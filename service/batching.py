"""The scheduler in front of each model version: queues, priorities, dynamic batching.

Every model version has one `Scheduler`. It honours Triton's configuration
(`max_batch_size`, `dynamic_batching { preferred_batch_size,
max_queue_delay_microseconds, preserve_ordering, priority_levels,
default_priority_level, default_queue_policy, priority_queue_policy }`,
`instance_group` count) and answers overload at once: a full queue rejects
with UNAVAILABLE ("Exceeds maximum queue size"), a request whose queue timeout
expires is rejected ("Request timeout expired") or, with `timeout_action:
DELAY`, moved behind everything else; a request whose client went away or
whose gRPC deadline passed is dropped before it is computed. Models without
`dynamic_batching` use the same queue and policies, one request per run.

Dispatch policy
---------------
Triton sends a batch when it reaches a preferred size or `max_batch_size`, or
when the oldest request has waited `max_queue_delay_microseconds`, so a lone
request on an idle model always pays the full delay. Here the delay is an
upper bound, spent only when waiting is predicted to lower latency:

* While every instance is busy, requests simply accumulate; when an instance
  frees, everything compatible that is queued goes out (cut at the largest
  preferred size reachable, never above `max_batch_size`). Batch size thus
  follows load with no timer involved.
* When an instance is free and `n` rows are queued, sending them now costs the
  next arrival the remainder of this run; waiting for it costs the `n` queued
  rows the gap until it arrives. With the time a run takes, from dispatch until
  its result is back on the event loop (thread handoffs included), modelled as
  `c(b) = a + beta * b` (least squares over recent runs of this model) and the
  gap `g` between arrivals (moving average), waiting for one more request
  lowers the total latency of the `n + 1` requests exactly when
  `g < (a - n * beta) / (n + 1)`. Only then does the scheduler wait, for at
  most `2 g` and never beyond the configured delay, re-deciding on every
  arrival. A lone request on an idle model, or any model whose runs cost
  little fixed overhead (`a` small, as on CPUs), is sent at once; a model with
  a large fixed cost per run (a GPU) under heavy traffic waits the fraction of
  a millisecond that fills the batch. No tuning of the delay is needed to get
  both.

Requests are batched only with requests of the same shape, except along the
dims of inputs the configuration declares paddable (`padding` parameter, or a
text model's token inputs): those are padded to the longest in the batch, and
a request joins a batch only while padding stays under `MAX_PADDING_WASTE` of
the batch's elements, which groups requests of similar length.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import fatal
from .errors import (
    FatalRuntimeError,
    InvalidInputError,
    ServerUnavailableError,
    ServingError,
    Status,
)
from .execution import BatchOutcome, ModelRunner
from .inference import InferenceRequest, InferenceResult
from .logs import REQUEST_ID
from .model_config import ModelConfigError, ModelSignature
from .protocol import model_config_pb2 as mc
from .statistics import ModelStats, RequestTimings

log = logging.getLogger(__name__)

# A request joins a batch only if padding stays below this share of its elements.
MAX_PADDING_WASTE = 0.25
_COST_WINDOW = 64
_ARRIVAL_SMOOTHING = 0.2


class DeadlineExceededError(ServingError):
    status = Status.DEADLINE_EXCEEDED


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy for one priority level."""

    max_queue_size: int  # requests; 0 = unbounded
    default_timeout_ns: int  # 0 = none
    allow_timeout_override: bool
    delay_on_timeout: bool

    @staticmethod
    def from_proto(policy: mc.ModelQueuePolicy, default_max_queue_size: int) -> QueuePolicy:
        return QueuePolicy(
            max_queue_size=policy.max_queue_size or default_max_queue_size,
            default_timeout_ns=policy.default_timeout_microseconds * 1000,
            allow_timeout_override=policy.allow_timeout_override,
            delay_on_timeout=policy.timeout_action == mc.ModelQueuePolicy.DELAY,
        )


@dataclass(frozen=True)
class BatchingPolicy:
    merge: bool  # dynamic batching: several requests per run
    max_batch_size: int  # rows per run when merging
    preferred: tuple[int, ...]
    max_delay_ns: int
    preserve_ordering: bool
    levels: int
    default_level: int
    queues: dict[int, QueuePolicy] = field(default_factory=dict)

    @staticmethod
    def from_config(config: mc.ModelConfig, default_max_queue_size: int) -> BatchingPolicy:
        merge = config.WhichOneof("scheduling_choice") == "dynamic_batching"
        batching = config.dynamic_batching
        levels = max(int(batching.priority_levels), 1)
        default_level = int(batching.default_priority_level) or (levels + 1) // 2
        if not 1 <= default_level <= levels:
            raise ModelConfigError(
                f"dynamic_batching default_priority_level is {default_level}; expected 1 to "
                f"{levels} (priority_levels)"
            )
        preferred = tuple(sorted(set(batching.preferred_batch_size)))
        for size in preferred:
            if not 1 <= size <= config.max_batch_size:
                raise ModelConfigError(
                    f"preferred_batch_size {size} is outside 1 to max_batch_size "
                    f"{config.max_batch_size}"
                )
        default_queue = QueuePolicy.from_proto(
            batching.default_queue_policy, default_max_queue_size
        )
        queues = {level: default_queue for level in range(1, levels + 1)}
        for level, policy in batching.priority_queue_policy.items():
            if not 1 <= level <= levels:
                raise ModelConfigError(
                    f"priority_queue_policy names level {level}; expected 1 to {levels}"
                )
            queues[int(level)] = QueuePolicy.from_proto(policy, default_max_queue_size)
        return BatchingPolicy(
            merge=merge and config.max_batch_size > 0,
            max_batch_size=max(config.max_batch_size, 1),
            preferred=preferred,
            max_delay_ns=int(batching.max_queue_delay_microseconds) * 1000,
            preserve_ordering=batching.preserve_ordering,
            levels=levels,
            default_level=default_level,
            queues=queues,
        )


class _Pending:
    """A request waiting in (or just dispatched from) the queue."""

    __slots__ = (
        "deadline_ns",
        "delayed",
        "dispatched_ns",
        "enqueued_ns",
        "expiry",
        "future",
        "key",
        "length",
        "level",
        "outcome",
        "request",
        "rows",
        "sequence",
    )

    def __init__(
        self,
        request: InferenceRequest,
        level: int,
        sequence: int,
        key: Any,
        length: int,
        future: asyncio.Future[tuple[InferenceResult, RequestTimings]],
    ) -> None:
        self.request = request
        self.rows = request.batch_size
        self.level = level
        self.sequence = sequence
        self.key = key
        self.length = length
        self.future = future
        self.enqueued_ns = time.perf_counter_ns()
        self.dispatched_ns = 0
        self.deadline_ns = request.deadline_ns
        self.expiry: asyncio.TimerHandle | None = None
        self.delayed = False
        self.outcome: tuple[InferenceResult, RequestTimings] | BaseException | None = None


@dataclass
class _Job:
    batch: list[_Pending]
    timings: RequestTimings
    started_ns: int


_INSTANCE_TASK_SECONDS = 3600.0  # longest warm-up a thread waits for the others


class _InstanceTask:
    """Work that every instance thread runs once, each on its own thread.

    A barrier holds each thread after its run so that no thread takes a second
    copy while another thread has none.
    """

    def __init__(self, task: Callable[[], Any], instances: int) -> None:
        self.task = task
        self._barrier = threading.Barrier(instances)
        self._lock = threading.Lock()
        self.results: list[Any] = []
        self.finished = threading.Event()
        self._instances = instances

    def run(self) -> None:
        result: Any = None
        try:
            result = self.task()
        except Exception as error:  # reported to the caller, not fatal to the thread
            result = error
        finally:
            with self._lock:
                self.results.append(result)
                if len(self.results) == self._instances:
                    self.finished.set()
            with contextlib.suppress(threading.BrokenBarrierError):  # another thread died
                self._barrier.wait(_INSTANCE_TASK_SECONDS)


@dataclass
class _Run:
    """One onnxruntime run and the requests whose outcome it decides."""

    members: list[_Pending]
    timings: RequestTimings
    outcome: BatchOutcome | BaseException


def _tag_log_lines(batch: Sequence[_Pending]) -> None:
    """Log lines from this thread (onnxruntime failures) name the requests being run."""
    REQUEST_ID.set(",".join(p.request.log_id for p in batch if p.request.log_id))


class _CostModel:
    """Execution time as a + beta * work, fitted over this model's recent runs.

    Work is rows times the padded length (just rows for fixed-shape models).

    Refitted every few runs rather than at every dispatch: the fit is a loop
    over the window, and the dispatch path runs once per request.
    """

    _REFIT_EVERY = 8

    def __init__(self) -> None:
        self._runs: collections.deque[tuple[int, int]] = collections.deque(maxlen=_COST_WINDOW)
        self._added = 0
        self._fitted: tuple[float, float] | None = None

    def add(self, rows: int, duration_ns: int) -> None:
        self._runs.append((rows, duration_ns))
        self._added += 1
        if self._added % self._REFIT_EVERY == 0 or self._added < self._REFIT_EVERY:
            self._fitted = self._fit()

    def fit(self) -> tuple[float, float] | None:
        return self._fitted

    def _fit(self) -> tuple[float, float] | None:
        if len(self._runs) < 4:
            return None
        count = len(self._runs)
        mean_rows = sum(r for r, _ in self._runs) / count
        mean_ns = sum(d for _, d in self._runs) / count
        spread = sum((r - mean_rows) ** 2 for r, _ in self._runs)
        if spread == 0:  # one batch size seen so far: all of it is fixed cost per row
            return None
        beta = sum((r - mean_rows) * (d - mean_ns) for r, d in self._runs) / spread
        beta = max(beta, 0.0)
        return max(mean_ns - beta * mean_rows, 0.0), beta


class Scheduler:
    """Queues, batches and runs the requests of one model version."""

    def __init__(
        self,
        runner: ModelRunner,
        signature: ModelSignature,
        policy: BatchingPolicy,
        instances: int,
        stats: ModelStats,
        label: str,
    ) -> None:
        self._runner = runner
        self._signature = signature
        self.policy = policy
        self._stats = stats
        self._label = label
        self._instances = instances
        self._free = instances
        # Each instance is a thread that runs batches handed over through a queue and
        # posts the outcome back to the loop: a cheaper handoff than run_in_executor's
        # future chain, which matters when a model's run is shorter than the handoff.
        self._jobs: queue.SimpleQueue[_Job | _InstanceTask | None] = queue.SimpleQueue()
        if instances < 1:
            raise ValueError(f"{label}: a scheduler needs at least one instance")
        self._closed = False
        self._instance_task_lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._work, name=f"{label} #{index}", daemon=True)
            for index in range(instances)
        ]
        for worker in self._workers:
            worker.start()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatch_pending = False
        # One deque per priority level (1 = highest), then one for DELAYed requests.
        self._queues: list[collections.deque[_Pending]] = [
            collections.deque() for _ in range(policy.levels + 1)
        ]
        self.queued_requests = 0
        self._sequence = 0
        self._unreleased: collections.deque[_Pending] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._costs = _CostModel()
        self._gap_ns: float | None = None
        self._last_arrival_ns = 0
        self._padded = tuple(sorted(signature.pad_values))

    @property
    def running(self) -> int:
        """Executions in flight now (at most the instance count)."""
        return self._instances - self._free

    # ------------------------------------------------------------ submit ---

    async def infer(self, request: InferenceRequest) -> tuple[InferenceResult, RequestTimings]:
        level = self._level(request)
        queue_policy = self.policy.queues[level]
        # Requests moved behind the others by timeout_action DELAY still occupy the queue.
        waiting = len(self._queues[level - 1]) + len(self._queues[-1])
        if queue_policy.max_queue_size and waiting >= queue_policy.max_queue_size:
            raise ServerUnavailableError(
                f"Exceeds maximum queue size: {self._label} has {waiting} requests queued at "
                f"priority {level} (max_queue_size {queue_policy.max_queue_size})"
            )
        loop = self._loop = asyncio.get_running_loop()
        key, length = self._batch_key(request)
        pending = _Pending(request, level, self._sequence, key, length, loop.create_future())
        self._sequence += 1
        self._note_arrival(pending.enqueued_ns)
        timeout = self._timeout_ns(request, queue_policy)
        if timeout:
            pending.expiry = loop.call_later(
                timeout / 1e9, self._expire, pending, queue_policy.delay_on_timeout
            )
        self._queues[level - 1].append(pending)
        self.queued_requests += 1
        if self.policy.preserve_ordering:
            self._unreleased.append(pending)
        self._dispatch_soon()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The client went away: if still queued, nobody computes it.
            if self._remove(pending):
                self._finish(pending, asyncio.CancelledError())
            raise

    def _level(self, request: InferenceRequest) -> int:
        priority = request.parameters.get("priority", 0)
        if priority == 0:
            return self.policy.default_level
        if priority > self.policy.levels:
            raise InvalidInputError(
                f"parameter 'priority' is {priority}; {self._label} has priority levels 1 to "
                f"{self.policy.levels} (1 is highest, 0 the default)"
            )
        return int(priority)

    @staticmethod
    def _timeout_ns(request: InferenceRequest, policy: QueuePolicy) -> int:
        timeout = policy.default_timeout_ns
        requested = request.parameters.get("timeout", 0)
        if requested and policy.allow_timeout_override:
            timeout = min(timeout, requested * 1000) if timeout else requested * 1000
        return timeout

    def _batch_key(self, request: InferenceRequest) -> tuple[Any, int]:
        """Requests batch together when their keys match; `length` is the padded extent."""
        if not self.policy.merge:
            return None, 0
        parts = []
        length = 1
        for name in sorted(request.inputs):
            shape = request.inputs[name].shape[1:]
            if name in self._padded:
                length = max(length, _product(shape))
                shape = tuple(-1 for _ in shape)
            parts.append((name, tuple(shape)))
        return tuple(parts), length

    def _note_arrival(self, now: int) -> None:
        if self._last_arrival_ns:
            gap = now - self._last_arrival_ns
            self._gap_ns = (
                float(gap)
                if self._gap_ns is None
                else _ARRIVAL_SMOOTHING * gap + (1 - _ARRIVAL_SMOOTHING) * self._gap_ns
            )
        self._last_arrival_ns = now

    # ---------------------------------------------------- leaving the queue ---

    def _remove(self, pending: _Pending) -> bool:
        queue = self._queues[-1] if pending.delayed else self._queues[pending.level - 1]
        try:
            queue.remove(pending)
        except ValueError:
            return False
        self.queued_requests -= 1
        if pending.expiry is not None:
            pending.expiry.cancel()
        return True

    def _fail(self, pending: _Pending, error: BaseException) -> None:
        if self._remove(pending):
            self._finish(pending, error)

    def _expire(self, pending: _Pending, delay: bool) -> None:
        if delay:
            if self._remove(pending):
                pending.delayed = True
                pending.expiry = None
                self._queues[-1].append(pending)
                self.queued_requests += 1
            return
        self._fail(
            pending,
            ServerUnavailableError(
                f"Request timeout expired: the request waited in {self._label}'s queue longer than "
                "its timeout"
            ),
        )
        self._dispatch()

    def _finish(
        self, pending: _Pending, outcome: tuple[InferenceResult, RequestTimings] | BaseException
    ) -> None:
        """Deliver a result or error, in arrival order when preserve_ordering is set."""
        pending.outcome = outcome
        if not self.policy.preserve_ordering:
            self._deliver(pending)
            return
        while self._unreleased and self._unreleased[0].outcome is not None:
            self._deliver(self._unreleased.popleft())

    @staticmethod
    def _deliver(pending: _Pending) -> None:
        if pending.future.done():
            return
        if isinstance(pending.outcome, BaseException):
            pending.future.set_exception(pending.outcome)
        elif pending.outcome is not None:
            pending.future.set_result(pending.outcome)

    # ---------------------------------------------------------- dispatch ---

    def _dispatch_soon(self) -> None:
        """Dispatch once the requests already in this loop iteration have arrived too.

        gRPC hands the loop several requests per iteration under load; deciding
        after all of them costs nothing at low load and batches them at high load.
        """
        if not self._dispatch_pending and self._loop is not None:
            self._dispatch_pending = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._free > 0 and self.queued_requests > 0:
            batch = self._select()
            if not batch:
                return
            self._free -= 1
            self._jobs.put(_Job(batch, RequestTimings(), time.perf_counter_ns()))

    def _ordered(self) -> list[_Pending]:
        return [pending for queue in self._queues for pending in queue]

    def _select(self) -> list[_Pending] | None:
        now = time.perf_counter_ns()
        candidates = self._ordered()
        expired = [p for p in candidates if p.deadline_ns and p.deadline_ns <= now]
        for pending in expired:
            self._fail(
                pending,
                DeadlineExceededError(
                    f"the request's deadline passed while it waited in {self._label}'s queue"
                ),
            )
        if expired:
            candidates = self._ordered()
        if not candidates:
            return None
        head = candidates[0]
        if not self.policy.merge:
            batch = [head]
        else:
            batch = self._gather(head, candidates)
            rows = sum(p.rows for p in batch)
            full = rows >= self._target(rows)
            work = rows * max(p.length for p in batch)
            if not full and self._should_wait(rows, work, head, now):
                return None
        for pending in batch:
            self._remove(pending)
            pending.dispatched_ns = now
        return batch

    def _gather(self, head: _Pending, candidates: Sequence[_Pending]) -> list[_Pending]:
        """Compatible requests in priority-then-arrival order, whole, within the limits."""
        limit = self.policy.max_batch_size
        preferred = self.policy.preferred
        batch = [head]
        rows = head.rows
        longest = head.length
        useful = head.rows * head.length
        for pending in candidates[1:]:
            if rows >= limit or (preferred and rows in preferred and rows >= preferred[-1]):
                break
            if pending.key != head.key or rows + pending.rows > limit:
                continue
            new_longest = max(longest, pending.length)
            new_rows = rows + pending.rows
            new_useful = useful + pending.rows * pending.length
            if self._padded and not self._padding_pays(
                rows * longest, new_rows * new_longest, new_useful, pending
            ):
                continue
            batch.append(pending)
            rows, longest, useful = new_rows, new_longest, new_useful
        if preferred:
            batch = self._cut_to_preferred(batch)
        return batch

    def _padding_pays(self, work: int, new_work: int, new_useful: int, pending: _Pending) -> bool:
        """Whether padding `pending` into the batch costs less than running it on its own.

        Merging saves one run's fixed cost `a` and costs `beta` per padded element
        added, so it pays when `beta * extra < a`. On a CPU, where a transformer's
        run has almost no fixed cost, that keeps different lengths apart; on a GPU
        it lets them share. Padding is never allowed past MAX_PADDING_WASTE of
        the batch, and before runs have been measured that cap alone decides.
        """
        if new_useful < (1 - MAX_PADDING_WASTE) * new_work:
            return False
        fit = self._costs.fit()
        if fit is None:
            return True
        fixed, per_unit = fit
        extra = new_work - work - pending.rows * pending.length
        return per_unit * extra <= fixed

    def _cut_to_preferred(self, batch: list[_Pending]) -> list[_Pending]:
        """The longest prefix whose rows hit the largest preferred size reachable."""
        total = 0
        prefix_rows = []
        for pending in batch:
            total += pending.rows
            prefix_rows.append(total)
        for size in reversed(self.policy.preferred):
            if size in prefix_rows:
                return batch[: prefix_rows.index(size) + 1]
        return batch

    def _target(self, rows: int) -> int:
        """The batch size worth waiting for: the smallest preferred size above `rows`."""
        for size in self.policy.preferred:
            if size >= rows:
                return size
        return self.policy.max_batch_size

    def _should_wait(self, rows: int, work: int, head: _Pending, now: int) -> bool:
        """Wait only if the next arrival is expected soon enough to lower total latency."""
        budget = self.policy.max_delay_ns - (now - head.enqueued_ns)
        if budget <= 0 or self._gap_ns is None:
            return False
        if now - self._last_arrival_ns > 4 * self._gap_ns:
            return False  # the stream of arrivals has paused
        fit = self._costs.fit()
        if fit is None:
            return False
        fixed, per_unit = fit
        if self._gap_ns >= (fixed - work * per_unit) / (rows + 1):
            return False
        wait = min(budget, 2 * self._gap_ns)
        self._timer = asyncio.get_running_loop().call_later(wait / 1e9, self._dispatch)
        return True

    # --------------------------------------------------------- execution ---

    def _work(self) -> None:
        """An instance: run batches until told to stop (None).

        A worker that dies leaves its queue unserved for good: that is fatal.
        """
        try:
            self._serve_jobs()
        except BaseException as error:
            fatal.report(f"{self._label}: a worker thread died: {error!r}")
            raise

    @property
    def instances(self) -> int:
        return self._instances

    def on_every_instance(self, task: Callable[[], Any]) -> list[Any]:
        """Run `task` once on each instance thread, all at once; returns what each returned.

        Blocks the caller (a loading thread, before the version takes requests).
        Warm-up runs here because onnxruntime's CUDA provider keeps per-thread
        state (cuBLAS and cuDNN handles) that a thread creates on its first run:
        warmed on the loading thread, an instance would still pay for it on its
        first real batch. An exception from `task` is returned, not raised.
        """
        with self._instance_task_lock:  # two tasks interleaved on the queue would deadlock
            if self._closed:
                raise RuntimeError(f"{self._label}: the scheduler is closed")
            work = _InstanceTask(task, self._instances)
            for _ in range(self._instances):
                self._jobs.put(work)
            while not work.finished.wait(1.0):
                if not any(worker.is_alive() for worker in self._workers):
                    raise RuntimeError(f"{self._label}: the instance threads have stopped")
            return list(work.results)

    def _serve_jobs(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, _InstanceTask):
                job.run()
                continue
            failed_attempt, runs = self._execute(job)
            loop = self._loop
            if loop is None or loop.is_closed():
                return
            try:
                loop.call_soon_threadsafe(self._completed, job, failed_attempt, runs)
            except RuntimeError:  # the loop closed while this run finished
                return

    def _execute(self, job: _Job) -> tuple[RequestTimings | None, list[_Run]]:
        """Run the batch; if onnxruntime rejects it, run each request on its own.

        One request's data (an out-of-range token id, say) can make onnxruntime
        fail a whole batch. Re-running the members one by one gives every other
        request its answer and keeps one client's error, which may quote its
        data, away from the others. Returns the failed batch attempt's timings
        (it still counts as an execution) and the runs whose outcomes to deliver.
        """
        batch = job.batch
        _tag_log_lines(batch)
        try:
            outcome = self._runner.execute([p.request for p in batch], job.timings)
            return None, [_Run(batch, job.timings, outcome)]
        except Exception as error:
            if len(batch) == 1 or not job.timings.executed or isinstance(error, FatalRuntimeError):
                return None, [_Run(batch, job.timings, error)]
            log.warning(
                "%s: a batch of %d requests failed in onnxruntime (%s); running them one by one",
                self._label,
                len(batch),
                error,
            )
        except BaseException as error:  # interpreter shutdown: tell the waiting clients
            return None, [_Run(batch, job.timings, error)]
        runs = []
        for pending in batch:
            timings = RequestTimings()
            _tag_log_lines([pending])
            single: BatchOutcome | BaseException
            try:
                single = self._runner.execute([pending.request], timings)
            except Exception as error:
                single = error
            runs.append(_Run([pending], timings, single))
        return job.timings, runs

    def _completed(
        self, job: _Job, failed_attempt: RequestTimings | None, runs: list[_Run]
    ) -> None:
        if failed_attempt is not None:
            self._stats.record_execution(sum(p.rows for p in job.batch), failed_attempt, 0, 0)
        for run in runs:
            rows = sum(p.rows for p in run.members)
            timings = run.timings
            if isinstance(run.outcome, BaseException):
                if timings.executed:  # onnxruntime ran (and failed): it counts as an execution
                    self._stats.record_execution(rows, timings, 0, 0)
                error = (
                    run.outcome
                    if isinstance(run.outcome, Exception)
                    else ServerUnavailableError("the server is shutting down")
                )
                for pending in run.members:
                    self._finish(pending, error)
                continue
            if failed_attempt is None:
                # What a run costs the scheduler: dispatch until the result is back on the
                # loop, thread handoffs included (they dominate for small models).
                work = rows * max(p.length for p in run.members)  # padded elements, in rows
                self._costs.add(work, time.perf_counter_ns() - job.started_ns)
            outcome = run.outcome
            self._stats.record_execution(rows, timings, outcome.elements, outcome.padded_elements)
            for pending, result in zip(run.members, outcome.results, strict=True):
                own = RequestTimings(
                    queue_ns=pending.dispatched_ns - pending.enqueued_ns,
                    compute_input_ns=timings.compute_input_ns,
                    compute_infer_ns=timings.compute_infer_ns,
                    compute_output_ns=timings.compute_output_ns,
                    executed=True,
                )
                self._finish(pending, (result, own))
        self._free += 1
        self._dispatch()

    def close(self) -> None:
        """Refuse what is still queued and tell the instances to stop (on the loop)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for pending in self._ordered():
            self._fail(pending, ServerUnavailableError("the model is unloading"))
        for _ in self._workers:
            self._jobs.put(None)

    def join(self, timeout: float) -> None:
        """Wait for runs in progress to end; blocking, so off the event loop."""
        for worker in self._workers:
            worker.join(timeout)


def _product(shape: Sequence[int]) -> int:
    result = 1
    for size in shape:
        result *= int(size)
    return result
