"""What the decision to hold a batch back weighs: the cost of a run and the pace of arrivals.

When an instance is free and `n` rows are queued, sending them now costs the
next arrival the remainder of this run; waiting for it costs the `n` queued
rows the gap until it arrives. With a run's time modelled as
`c(work) = a + beta * work` (least squares over this model's recent runs) and
`g` the gap between arrivals (moving average), waiting for one more request
lowers the total latency of the `n + 1` requests exactly when
`g < (a - work * beta) / (n + 1)`. A model whose runs cost little fixed time
(`a` small, as on CPUs) is therefore never held back; one with a large fixed
cost per run (a GPU) under heavy traffic waits the fraction of a millisecond
that fills the batch.
"""

from __future__ import annotations

import collections

_WINDOW = 64
_ARRIVAL_SMOOTHING = 0.2
# Arrivals count as paused once none has come for this many average gaps.
_PAUSE_GAPS = 4


class CostModel:
    """Execution time as a + beta * work, fitted over this model's recent runs.

    Work is rows times the padded length (just rows for fixed-shape models).
    The sums the least-squares fit needs are kept as runs enter and leave the
    window, so adding a run and reading the fit cost the same whatever the window.
    """

    def __init__(self) -> None:
        self._runs: collections.deque[tuple[int, int]] = collections.deque()
        self._sum_work = 0.0
        self._sum_ns = 0.0
        self._sum_work_squared = 0.0
        self._sum_work_ns = 0.0

    def add(self, work: int, duration_ns: int) -> None:
        self._runs.append((work, duration_ns))
        self._shift(work, duration_ns, 1)
        if len(self._runs) > _WINDOW:
            self._shift(*self._runs.popleft(), -1)

    def _shift(self, work: int, duration_ns: int, sign: int) -> None:
        self._sum_work += sign * work
        self._sum_ns += sign * duration_ns
        self._sum_work_squared += sign * work * work
        self._sum_work_ns += sign * work * duration_ns

    def fit(self) -> tuple[float, float] | None:
        """(a, beta) in nanoseconds, or None while too few work sizes have been seen."""
        count = len(self._runs)
        if count < 4:
            return None
        mean_work = self._sum_work / count
        mean_ns = self._sum_ns / count
        spread = self._sum_work_squared - count * mean_work * mean_work
        if spread <= 1e-9 * max(self._sum_work_squared, 1.0):
            return None  # one work size so far: fixed and per-row cost are inseparable
        beta = max((self._sum_work_ns - count * mean_work * mean_ns) / spread, 0.0)
        return max(mean_ns - beta * mean_work, 0.0), beta


class Arrivals:
    """The moving average of the gap between a model's requests, and the latest arrival."""

    def __init__(self) -> None:
        self.gap_ns: float | None = None
        self.last_ns = 0

    def note(self, now_ns: int) -> None:
        if self.last_ns:
            gap = now_ns - self.last_ns
            self.gap_ns = (
                float(gap)
                if self.gap_ns is None
                else _ARRIVAL_SMOOTHING * gap + (1 - _ARRIVAL_SMOOTHING) * self.gap_ns
            )
        self.last_ns = now_ns


def hold_ns(
    rows: int,
    work: int,
    budget_ns: int,
    arrivals: Arrivals,
    fit: tuple[float, float] | None,
    now_ns: int,
    others_in_flight: bool,
) -> int:
    """How long to hold `rows` queued rows (`work` padded elements) for one more arrival.

    0 means send them now. `budget_ns` is what is left of the configured
    max_queue_delay for the oldest of them. Nothing is held when no other
    request of the model is in flight: a closed-loop client whose one request
    is queued cannot send another until it is answered.
    """
    gap = arrivals.gap_ns
    if budget_ns <= 0 or gap is None or fit is None or not others_in_flight:
        return 0
    if now_ns - arrivals.last_ns > _PAUSE_GAPS * gap:
        return 0
    fixed, per_unit = fit
    if gap >= (fixed - work * per_unit) / (rows + 1):
        return 0
    return int(min(budget_ns, 2 * gap))
