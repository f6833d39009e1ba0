"""The scheduler in front of each model version: queues, priorities, dynamic batching.

Every model version has one `Scheduler` and one thread per instance
(`instance_group` count). The event loop only queues a request and, if an
instance is idle, wakes it; the instance threads form batches themselves, run
them and hand the outcomes back to the loop once per batch. Under load an
instance that finishes a run takes the next batch straight from the queue, so
no batch waits for the event loop (or for the GIL it holds) to be dispatched;
on an idle model a request goes to the instance that was waiting for it.

It honours Triton's configuration (`max_batch_size`, `dynamic_batching {
preferred_batch_size, max_queue_delay_microseconds, preserve_ordering,
priority_levels, default_priority_level, default_queue_policy,
priority_queue_policy }`, `instance_group` count) and answers overload at once:
a full queue rejects with UNAVAILABLE ("Exceeds maximum queue size"), a request
whose queue timeout expires is rejected ("Request timeout expired") or, with
`timeout_action: DELAY`, moved behind everything else; a request whose client
went away or whose gRPC deadline passed is dropped before it is computed.
Models without `dynamic_batching` use the same queue and policies, one request
per run.

Dispatch policy: Triton sends a batch when it reaches a preferred size or
`max_batch_size`, or when the oldest request has waited
`max_queue_delay_microseconds`, so a lone request on an idle model always pays
the full delay. Here the delay is an upper bound, spent only when waiting is
predicted to lower latency (`costs.hold_ns`). While every instance is busy,
requests accumulate, and an instance that frees takes everything compatible
(cut at the largest preferred size reachable, never above `max_batch_size`):
batch size follows load with no timer involved.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import fatal
from ..errors import (
    DeadlineExceededError,
    FatalRuntimeError,
    InvalidInputError,
    ServerUnavailableError,
)
from ..execution import BatchOutcome, ModelRunner
from ..inference import InferenceRequest
from ..logs import REQUEST_ID
from ..model_config import ModelSignature
from ..statistics import ModelStats, RequestTimings
from .costs import Arrivals, CostModel, hold_ns
from .policy import BatchingPolicy, QueuePolicy
from .queue import Outcome, Pending, RequestQueue

log = logging.getLogger(__name__)

_INSTANCE_TASK_POLL_SECONDS = 1.0
# A lone request runs on the event loop itself when its model's single runs of the same size
# take at most this long: the hand-off to an instance thread and back (two thread wake-ups)
# costs more than that saves at this scale, and blocking the loop for this long delays only
# calls that arrive meanwhile, by at most this much.
INLINE_RUN_LIMIT_NS = 1_000_000
# Inline runs this many times over the limit count as overruns; this many more overruns than
# normal runs turn inline runs off for the version.
_INLINE_OVERRUN = 5
_OVERRUNS_TO_STOP = 3
_SOLO_SMOOTHING = 0.2
# Work sizes whose single-request run time is remembered (a text model has one per length).
_SOLO_SIZES = 256


@dataclass
class _Job:
    batch: list[Pending]
    timings: RequestTimings
    started_ns: int
    # Other runs are in progress or waiting: run on one thread (ModelRunner.execute).
    narrow: bool = False


@dataclass
class _Run:
    """One onnxruntime run and the requests whose outcome it decides."""

    members: list[Pending]
    timings: RequestTimings
    outcome: BatchOutcome | BaseException


class _InstanceTask:
    """Work that every instance thread runs once (warm-up), each on its own thread."""

    def __init__(self, task: Callable[[], Any], instances: int) -> None:
        self.task = task
        self._lock = threading.Lock()
        self._instances = instances
        self.results: list[Any] = []
        self.finished = threading.Event()

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


class _Instance:
    """One instance thread and the lock it sleeps on while it has nothing to run.

    The lock is held while the instance is awake. Whoever takes an idle
    instance off the scheduler's idle list (under the scheduler's lock)
    releases it exactly once; the instance acquires it to sleep.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.wake = threading.Lock()
        self.wake.acquire()
        self.task: _InstanceTask | None = None
        self.thread: threading.Thread | None = None


def _tag_log_lines(batch: Sequence[Pending]) -> None:
    """Log lines from this thread (onnxruntime failures) name the requests being run."""
    REQUEST_ID.set(",".join(p.request.log_id for p in batch if p.request.log_id))


def _elements(request: InferenceRequest) -> int:
    """The size a lone request's run time is remembered under: every element of
    every input, so that no other shape (a larger image of a model with dynamic
    height and width, a longer text) borrows a small request's estimate."""
    return sum(array.size for array in request.inputs.values())


def _product(shape: Sequence[int]) -> int:
    result = 1
    for size in shape:
        result *= int(size)
    return result


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
        inline_runs: bool = False,
    ) -> None:
        """`inline_runs`: a lone request may run on the event loop (CPU sessions whose
        run time does not depend on the data, see `onnx_ops`)."""
        if instances < 1:
            raise ValueError(f"{label}: a scheduler needs at least one instance")
        self._runner = runner
        self.policy = policy
        self._stats = stats
        self._label = label
        self._padded = tuple(sorted(signature.pad_values))
        # Shared by the loop and the instance threads: everything below it.
        self._lock = threading.Lock()
        self._queue = RequestQueue(policy, self._padded)
        self._idle: list[_Instance] = []
        self._running = 0
        # Submitted and not yet answered: queued, running, or on their way back.
        self._outstanding = 0
        self._closed = False
        self._costs = CostModel()
        self._arrivals = Arrivals()
        # Moving average of the runs of a lone request, by its number of input elements.
        self._solo_ns: dict[int, float] = {}
        # GPU sessions keep per-thread state: their runs stay on the instance threads.
        self._inline = inline_runs and not runner.on_gpu
        self._overruns = 0
        # Requests that ran on the event loop (a count for tests and investigations).
        self.inline_runs = 0
        # Loop-side only.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unreleased: collections.deque[Pending] = collections.deque()
        self._instance_task_lock = threading.Lock()
        self._instances = [_Instance(index) for index in range(instances)]
        for instance in self._instances:
            instance.thread = threading.Thread(
                target=self._work, args=(instance,), name=f"{label} #{instance.index}", daemon=True
            )
            instance.thread.start()

    @property
    def running(self) -> int:
        """Executions in flight now (at most the instance count)."""
        return self._running

    @property
    def instances(self) -> int:
        return len(self._instances)

    @property
    def queued_requests(self) -> int:
        return self._queue.size

    # ------------------------------------------------------------ submit ---

    async def infer(self, request: InferenceRequest, alone: bool = False) -> Outcome:
        """Queue a validated request and wait for its result and timings.

        `alone`: no other request is in flight in the whole server. Such a
        request, on an idle CPU model whose runs are short, runs right here on
        the event loop: the hand-off to an instance thread and back would cost
        more than the run itself.
        """
        level = self._level(request)
        queue_policy = self.policy.queues[level]
        loop = self._loop = asyncio.get_running_loop()
        key, length = self._batch_key(request)
        pending = Pending(request, level, key, length, loop.create_future())
        with self._lock:
            if self._closed:
                raise ServerUnavailableError(f"{self._label} is unloading")
            inline = (
                alone
                and self._inline
                and self._outstanding == 0
                and self._running == 0
                and self._solo_ns.get(_elements(request), INLINE_RUN_LIMIT_NS + 1)
                <= INLINE_RUN_LIMIT_NS
            )
            if inline:
                self._running += 1
                self._outstanding += 1
        if inline:
            return self._run_inline(pending)
        with self._lock:
            waiting = self._queue.waiting_at(level)
            if queue_policy.max_queue_size and waiting >= queue_policy.max_queue_size:
                raise ServerUnavailableError(
                    f"Exceeds maximum queue size: {self._label} has {waiting} requests queued "
                    f"at priority {level} (max_queue_size {queue_policy.max_queue_size})"
                )
            self._queue.push(pending)
            self._arrivals.note(pending.enqueued_ns)
            self._outstanding += 1
            idle = self._idle.pop() if self._idle else None
        if idle is not None:
            idle.wake.release()
        timeout = self._timeout_ns(request, queue_policy)
        if timeout:
            pending.expiry = loop.call_later(
                timeout / 1e9, self._expire, pending, queue_policy.delay_on_timeout
            )
        if self.policy.preserve_ordering:
            self._unreleased.append(pending)
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The client went away: if still queued, nobody computes it.
            if self._withdraw(pending):
                self._finish(pending, asyncio.CancelledError())
            raise

    def _level(self, request: InferenceRequest) -> int:
        priority = request.parameters.get("priority", 0) if request.parameters else 0
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
        requested = request.parameters.get("timeout", 0) if request.parameters else 0
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

    def _run_inline(self, pending: Pending) -> Outcome:
        self.inline_runs += 1
        pending.dispatched_ns = pending.enqueued_ns
        if self.policy.preserve_ordering:
            self._unreleased.append(pending)  # nothing else is outstanding: it is next
        job, failed_attempt, runs = self._run([pending])
        # One long run can be the OS preempting the loop; runs that keep taking far longer
        # than the estimate say this model's run time depends on the data.
        took = job.timings.compute_infer_ns
        if took > _INLINE_OVERRUN * INLINE_RUN_LIMIT_NS:
            self._overruns += 1
            if self._overruns >= _OVERRUNS_TO_STOP:
                self._inline = False
                log.warning(
                    "%s: runs on the event loop took up to %.1f ms, far over their estimate; "
                    "this version's requests run on its instance threads from now on",
                    self._label,
                    took / 1e6,
                )
        elif self._overruns:
            self._overruns -= 1
        self._completed(job, failed_attempt, runs)
        return pending.future.result()

    def _withdraw(self, pending: Pending) -> bool:
        """Take a still-queued request out for good; False if an instance already has it."""
        with self._lock:
            removed = self._queue.remove(pending)
            if removed:
                self._outstanding -= 1
        return removed

    def _expire(self, pending: Pending, delay: bool) -> None:
        """The queue policy's timeout fired (on the loop)."""
        if delay:
            with self._lock:
                self._queue.delay(pending)
            return
        if self._withdraw(pending):
            self._finish(
                pending,
                ServerUnavailableError(
                    f"Request timeout expired: the request waited in {self._label}'s queue "
                    "longer than its timeout"
                ),
            )

    # ---------------------------------------------------- answering (loop) ---

    def _finish(self, pending: Pending, outcome: Outcome | BaseException) -> None:
        """Deliver a result or error, in arrival order when preserve_ordering is set."""
        if pending.expiry is not None:
            pending.expiry.cancel()
        pending.outcome = outcome
        if not self.policy.preserve_ordering:
            self._deliver(pending)
            return
        while self._unreleased and self._unreleased[0].outcome is not None:
            self._deliver(self._unreleased.popleft())

    @staticmethod
    def _deliver(pending: Pending) -> None:
        if pending.future.done():
            return
        if isinstance(pending.outcome, BaseException):
            pending.future.set_exception(pending.outcome)
        elif pending.outcome is not None:
            pending.future.set_result(pending.outcome)

    def _fail_taken(self, pendings: list[Pending], error: Exception) -> None:
        """Fail requests an instance took out of the queue without running them."""
        with self._lock:
            self._outstanding -= len(pendings)
        for pending in pendings:
            self._finish(pending, error)

    def _completed(
        self, job: _Job, failed_attempt: RequestTimings | None, runs: list[_Run]
    ) -> None:
        if failed_attempt is not None:
            self._stats.record_execution(sum(p.rows for p in job.batch), failed_attempt, 0, 0)
        with self._lock:
            self._outstanding -= len(job.batch)
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

    def _post(self, callback: Callable[..., None], *args: Any) -> bool:
        """Run `callback` on the loop; False if the loop is gone (shutdown)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed in between
            return False
        return True

    # --------------------------------------------------- instance threads ---

    def _work(self, instance: _Instance) -> None:
        """An instance: run batches until the scheduler closes.

        A worker that dies leaves its queue unserved for good: that is fatal.
        """
        try:
            self._serve(instance)
        except BaseException as error:
            fatal.report(f"{self._label}: a worker thread died: {error!r}")
            raise

    def _serve(self, instance: _Instance) -> None:
        while True:
            batch: list[Pending] = []
            expired: list[Pending] = []
            hold = 0
            narrow = False
            with self._lock:
                task, instance.task = instance.task, None
                if task is None:
                    now = time.perf_counter_ns()
                    expired = self._queue.take_expired(now)
                    batch, hold = self._select(now)
                    if batch:
                        narrow = self._running > 0 or self._queue.size > 0
                        self._running += 1
                    elif self._closed:
                        return
                    else:
                        self._idle.append(instance)
            if expired:
                self._post(
                    self._fail_taken,
                    expired,
                    DeadlineExceededError(
                        f"the request's deadline passed while it waited in {self._label}'s queue"
                    ),
                )
            if task is not None:
                task.run()
            elif batch:
                self._post(self._completed, *self._run(batch, narrow))
            else:
                self._sleep(instance, hold)

    def _select(self, now: int) -> tuple[list[Pending], int]:
        """The batch to run now, or none and how long to hold the queue (0: until woken)."""
        fit = self._costs.fit()
        row_limit = self._narrow_rows()
        batch = self._queue.gather(fit, row_limit)
        if not batch:
            return [], 0
        if self.policy.merge:
            rows = sum(p.rows for p in batch)
            if rows < min(self._queue.target(rows), row_limit or rows + 1):
                head = batch[0]
                hold = hold_ns(
                    rows,
                    rows * max(p.length for p in batch),
                    self.policy.max_delay_ns - (now - head.enqueued_ns),
                    self._arrivals,
                    fit,
                    now,
                    others_in_flight=self._outstanding > self._queue.size,
                )
                if hold:
                    return [], hold
        for pending in batch:
            self._queue.remove(pending)
            pending.dispatched_ns = now
        return batch, 0

    def _narrow_rows(self) -> int:
        """The rows one instance takes while others run on one thread each (0: no cap).

        A model big enough to get several threads gains little from batching on a
        CPU (its layers already keep a core busy at one row; a transformer's
        attention even gets slower per row), and a batch one instance takes is
        work the other instances cannot share: one request at a time each.
        """
        if not self._runner.has_narrow or (self._running == 0 and self._queue.size <= 1):
            return 0
        return 1

    def _sleep(self, instance: _Instance, hold_ns: int) -> None:
        """Wait to be woken (an arrival, a task, closing) or for `hold_ns` to pass."""
        if instance.wake.acquire(timeout=hold_ns / 1e9 if hold_ns else -1):
            return
        with self._lock:
            if instance in self._idle:
                self._idle.remove(instance)
                return
        # Someone took this instance off the idle list: its release is on the way.
        instance.wake.acquire()

    def _run(
        self, batch: list[Pending], narrow: bool = False
    ) -> tuple[_Job, RequestTimings | None, list[_Run]]:
        """Execute a taken batch and account for its cost; the caller delivers the outcome."""
        job = _Job(batch, RequestTimings(), time.perf_counter_ns(), narrow)
        failed_attempt, runs = self._execute(job)
        duration = time.perf_counter_ns() - job.started_ns
        with self._lock:
            self._running -= 1
            if failed_attempt is None and not isinstance(runs[0].outcome, BaseException):
                rows = sum(p.rows for p in batch)
                work = rows * max(p.length for p in batch)  # padded elements, in rows
                self._costs.add(work, duration)
                if len(batch) == 1 and self._inline:  # the run itself, not the hand-offs
                    timings = job.timings
                    self._note_solo(
                        _elements(batch[0].request),
                        timings.compute_input_ns
                        + timings.compute_infer_ns
                        + timings.compute_output_ns,
                    )
        return job, failed_attempt, runs

    def _note_solo(self, elements: int, duration_ns: int) -> None:
        """Remember how long one request of this size takes (under the lock)."""
        known = self._solo_ns.get(elements)
        if known is None:
            if len(self._solo_ns) >= _SOLO_SIZES:
                return
            self._solo_ns[elements] = float(duration_ns)
        else:
            self._solo_ns[elements] = _SOLO_SMOOTHING * duration_ns + (1 - _SOLO_SMOOTHING) * known

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
            outcome = self._runner.execute([p.request for p in batch], job.timings, job.narrow)
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
                single = self._runner.execute([pending.request], timings, job.narrow)
            except Exception as error:
                single = error
            runs.append(_Run([pending], timings, single))
        return job.timings, runs

    def on_every_instance(self, task: Callable[[], Any]) -> list[Any]:
        """Run `task` once on each instance thread, all at once; returns what each returned.

        Blocks the caller (a loading thread, before the version takes requests).
        Warm-up runs here because onnxruntime's CUDA provider keeps per-thread
        state (cuBLAS and cuDNN handles) that a thread creates on its first run:
        warmed on the loading thread, an instance would still pay for it on its
        first real batch. An exception from `task` is returned, not raised.
        """
        with self._instance_task_lock:  # one task at a time per instance
            work = _InstanceTask(task, len(self._instances))
            woken = []
            with self._lock:
                if self._closed:
                    raise RuntimeError(f"{self._label}: the scheduler is closed")
                for instance in self._instances:
                    instance.task = work
                    if instance in self._idle:
                        self._idle.remove(instance)
                        woken.append(instance)
            for instance in woken:
                instance.wake.release()
            while not work.finished.wait(_INSTANCE_TASK_POLL_SECONDS):
                if not any(i.thread is not None and i.thread.is_alive() for i in self._instances):
                    raise RuntimeError(f"{self._label}: the instance threads have stopped")
            return list(work.results)

    # ----------------------------------------------------------- closing ---

    def close(self) -> None:
        """Refuse what is still queued and tell the instances to stop (on the loop)."""
        with self._lock:
            self._closed = True
            queued = self._queue.clear()
            self._outstanding -= len(queued)
            idle, self._idle = self._idle, []
        for instance in idle:
            instance.wake.release()
        for pending in queued:
            self._finish(pending, ServerUnavailableError("the model is unloading"))

    def join(self, timeout: float) -> None:
        """Wait for runs in progress to end; blocking, so off the event loop."""
        for instance in self._instances:
            if instance.thread is not None:
                instance.thread.join(timeout)
