"""The requests waiting for one model version, and how a batch is drawn from them.

Requests are batched only with requests of the same shape, except along the
dims of inputs the configuration declares paddable (`padding` parameter, or a
text model's token inputs): those are padded to the longest in the batch, and
a request joins a batch only while padding stays under `MAX_PADDING_WASTE` of
the batch's elements, which groups requests of similar length.

Nothing here is thread-safe: the scheduler holds its lock around every call.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Iterator
from typing import Any

from ..inference import InferenceRequest, InferenceResult
from ..statistics import RequestTimings
from .policy import BatchingPolicy

# A request joins a batch only if padding stays below this share of its elements.
MAX_PADDING_WASTE = 0.25

Outcome = tuple[InferenceResult, RequestTimings]


class Pending:
    """A request waiting in (or just taken from) the queue."""

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
    )

    def __init__(
        self,
        request: InferenceRequest,
        level: int,
        key: Any,
        length: int,
        future: asyncio.Future[Outcome],
    ) -> None:
        self.request = request
        self.rows = request.batch_size
        self.level = level
        self.key = key
        self.length = length
        self.future = future
        self.enqueued_ns = time.perf_counter_ns()
        self.dispatched_ns = 0
        self.deadline_ns = request.deadline_ns
        self.expiry: asyncio.TimerHandle | None = None
        self.delayed = False
        self.outcome: Outcome | BaseException | None = None


class RequestQueue:
    """One deque per priority level (1 = highest), then one for requests DELAYed by timeout."""

    def __init__(self, policy: BatchingPolicy, padded: tuple[str, ...]) -> None:
        self._policy = policy
        self._padded = padded
        self._levels: list[collections.deque[Pending]] = [
            collections.deque() for _ in range(policy.levels + 1)
        ]
        self.size = 0
        self._with_deadline = 0

    def __iter__(self) -> Iterator[Pending]:
        """Priority order, then arrival order; DELAYed requests last."""
        return itertools.chain.from_iterable(self._levels)

    def waiting_at(self, level: int) -> int:
        """What counts against `level`'s max_queue_size: DELAYed requests still occupy it."""
        return len(self._levels[level - 1]) + len(self._levels[-1])

    def push(self, pending: Pending) -> None:
        self._levels[-1 if pending.delayed else pending.level - 1].append(pending)
        self.size += 1
        if pending.deadline_ns:
            self._with_deadline += 1

    def remove(self, pending: Pending) -> bool:
        """Take `pending` out; False if it was not queued (already taken or failed)."""
        queue = self._levels[-1] if pending.delayed else self._levels[pending.level - 1]
        if queue and queue[0] is pending:
            queue.popleft()
        else:
            try:
                queue.remove(pending)
            except ValueError:
                return False
        self.size -= 1
        if pending.deadline_ns:
            self._with_deadline -= 1
        return True

    def delay(self, pending: Pending) -> bool:
        """timeout_action DELAY: move `pending` behind every other request."""
        if pending.delayed or not self.remove(pending):
            return False
        pending.delayed = True
        self.push(pending)
        return True

    def clear(self) -> list[Pending]:
        everything = list(self)
        for queue in self._levels:
            queue.clear()
        self.size = self._with_deadline = 0
        return everything

    def take_expired(self, now_ns: int) -> list[Pending]:
        """Remove and return the requests whose gRPC deadline has passed."""
        if not self._with_deadline:
            return []
        expired = [p for p in self if p.deadline_ns and p.deadline_ns <= now_ns]
        for pending in expired:
            self.remove(pending)
        return expired

    # ------------------------------------------------------------ batches ---

    def gather(self, fit: tuple[float, float] | None, row_limit: int = 0) -> list[Pending]:
        """Compatible requests in priority-then-arrival order, whole, within the limits.

        `fit` is the model's run cost (a, beta), which decides whether padding
        a request into the batch pays; `row_limit` (if set) caps the batch below
        max_batch_size; the head of the queue always goes.
        """
        candidates = iter(self)
        head = next(candidates, None)
        if head is None:
            return []
        batch = [head]
        if not self._policy.merge:
            return batch
        limit = min(self._policy.max_batch_size, row_limit or self._policy.max_batch_size)
        preferred = self._policy.preferred
        rows = head.rows
        longest = head.length
        useful = head.rows * head.length
        for pending in candidates:
            if rows >= limit or (preferred and rows in preferred and rows >= preferred[-1]):
                break
            if pending.key != head.key or rows + pending.rows > limit:
                continue
            new_longest = max(longest, pending.length)
            new_rows = rows + pending.rows
            new_useful = useful + pending.rows * pending.length
            if self._padded and not _padding_pays(
                rows * longest, new_rows * new_longest, new_useful, pending, fit
            ):
                continue
            batch.append(pending)
            rows, longest, useful = new_rows, new_longest, new_useful
        if preferred:
            batch = self._cut_to_preferred(batch)
        return batch

    def _cut_to_preferred(self, batch: list[Pending]) -> list[Pending]:
        """The longest prefix whose rows hit the largest preferred size reachable."""
        prefix_rows = list(itertools.accumulate(p.rows for p in batch))
        for size in reversed(self._policy.preferred):
            if size in prefix_rows:
                return batch[: prefix_rows.index(size) + 1]
        return batch

    def target(self, rows: int) -> int:
        """The batch size worth waiting for: the smallest preferred size at or above `rows`."""
        for size in self._policy.preferred:
            if size >= rows:
                return size
        return self._policy.max_batch_size


def _padding_pays(
    work: int, new_work: int, new_useful: int, pending: Pending, fit: tuple[float, float] | None
) -> bool:
    """Whether padding `pending` into the batch costs less than running it on its own.

    Merging saves one run's fixed cost `a` and costs `beta` per padded element
    added, so it pays when `beta * extra < a`. On a CPU, where a transformer's
    run has almost no fixed cost, that keeps different lengths apart; on a GPU
    it lets them share. Padding is never allowed past MAX_PADDING_WASTE of
    the batch, and before runs have been measured that cap alone decides.
    """
    if new_useful < (1 - MAX_PADDING_WASTE) * new_work:
        return False
    if fit is None:
        return True
    fixed, per_unit = fit
    extra = new_work - work - pending.rows * pending.length
    return per_unit * extra <= fixed
