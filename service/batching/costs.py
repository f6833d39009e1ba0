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
    Refitted every few runs rather than at every decision: the fit is a loop
    over the window, and decisions are taken once per batch.
    """

    _REFIT_EVERY = 8

    def __init__(self) -> None:
        self._runs: collections.deque[tuple[int, int]] = collections.deque(maxlen=_WINDOW)
        self._added = 0
        self._fitted: tuple[float, float] | None = None

    def add(self, work: int, duration_ns: int) -> None:
        self._runs.append((work, duration_ns))
        self._added += 1
        if self._added % self._REFIT_EVERY == 0 or self._added < self._REFIT_EVERY:
            self._fitted = self._fit()

    def fit(self) -> tuple[float, float] | None:
        """(a, beta) in nanoseconds, or None while one work size has been seen."""
        return self._fitted

    def _fit(self) -> tuple[float, float] | None:
        if len(self._runs) < 4:
            return None
        count = len(self._runs)
        mean_work = sum(w for w, _ in self._runs) / count
        mean_ns = sum(d for _, d in self._runs) / count
        spread = sum((w - mean_work) ** 2 for w, _ in self._runs)
        if spread == 0:  # one batch size seen so far: fixed and per-row cost are inseparable
            return None
        beta = sum((w - mean_work) * (d - mean_ns) for w, d in self._runs) / spread
        beta = max(beta, 0.0)
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
