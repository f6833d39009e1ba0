"""How many threads onnxruntime gets for a session, and whether they spin.

On a CPU two costs pull apart. A model whose run takes milliseconds (ResNet,
a transformer) runs fastest on every core its instances can share, with the
threads busy-waiting between operators: a sleeping thread takes tens of
microseconds to wake (more on a virtual machine), and such a model has
hundreds of operators per run. A model whose run takes a fraction of a
millisecond gains little from a second thread, and that thread takes the core
the event loop and the clients need. So, unless the model's parameters or the
server's flags say otherwise, a CPU session starts with its share of the cores
and spinning during runs (never between them), one single-row run is timed,
and a model that runs it in under `SMALL_RUN_NS` gets one thread that never
spins instead. GPU sessions keep onnxruntime's defaults without spinning: the
GPU does the work and a spinning thread would only take a core.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Below this, a single-row run is not worth a second thread.
SMALL_RUN_NS = 1_000_000
_TIMED_RUNS = 3
# The sequence length a variable-length model is timed at.
_TIMED_LENGTH = 64


@dataclass(frozen=True)
class Threads:
    """onnxruntime settings for one session."""

    intra_op: int  # 0: onnxruntime's default, one per core
    spinning: bool
    # Spinning only while a run is in progress (session.force_spinning_stop).
    spin_during_runs_only: bool = False
    # Chosen by the server, to be confirmed by timing a run (`settle`).
    measure: bool = False

    def describe(self) -> str:
        threads = "onnxruntime's default" if self.intra_op == 0 else str(self.intra_op)
        if not self.spinning:
            spin = "no spinning"
        elif self.spin_during_runs_only:
            spin = "spinning during runs"
        else:
            spin = "spinning"
        return f"intra-op threads {threads}, {spin}"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan(
    intra_op: int | None,
    spinning: bool | None,
    on_gpu: bool,
    instances: int,
    cores: int | None = None,
) -> Threads:
    """The settings to create a session with.

    `intra_op` and `spinning` are what the model's parameters (or else the
    server's flags) ask for; None leaves the choice to the server.
    """
    if on_gpu:
        return Threads(intra_op or 0, bool(spinning))
    share = max(1, (cores or usable_cores()) // max(instances, 1))
    if intra_op is not None and spinning is not None:
        return Threads(intra_op, spinning)
    if intra_op is not None:
        return Threads(intra_op, intra_op != 1, spin_during_runs_only=True)
    if spinning is not None:
        return Threads(share, spinning, measure=share > 1)
    return Threads(share, share > 1, spin_during_runs_only=True, measure=share > 1)


class Runnable(Protocol):
    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]: ...


def single_row_run_ns(
    session: Runnable, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]
) -> int | None:
    """The fastest of a few single-row runs, after one to warm up; None if it fails."""
    best: int | None = None
    try:
        session.run(feeds, outputs)
        for _ in range(_TIMED_RUNS):
            started = time.perf_counter_ns()
            session.run(feeds, outputs)
            took = time.perf_counter_ns() - started
            best = took if best is None else min(best, took)
    except Exception:  # a model that needs real data: keep the planned threads
        return None
    return best


def settle(planned: Threads, run_ns: int | None) -> Threads:
    """The final settings once a single-row run has been timed with `planned`."""
    if not planned.measure or run_ns is None or run_ns >= SMALL_RUN_NS:
        return planned
    return Threads(1, False)


def timed_length() -> int:
    return _TIMED_LENGTH
