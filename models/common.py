"""What every model build shares: seeding, export with a parity gate, batch-size measurement.

Only the training/export side imports this (torch, onnx); the server never does.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

REPOSITORY = Path(__file__).resolve().parent / "repository"
OPSET = 17
PARITY_TOLERANCE = 1e-4


def seed_everything(seed: int) -> None:
    """Same seed, same weights: training is reproducible on one machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def cpu_session(path: Path | str | bytes, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(
        path if isinstance(path, bytes) else str(path), options, providers=["CPUExecutionProvider"]
    )


class ParityError(RuntimeError):
    """The exported graph does not compute what the trained model computes."""


@dataclass
class ExportReport:
    opset: int
    max_abs_diff: float
    torch_accuracy: float | None = None
    onnx_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def export_with_parity(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    target: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
    check: Callable[[ort.InferenceSession], ExportReport],
) -> ExportReport:
    """Export to a temporary file, run `check`, and only then move the file into place.

    `check` compares onnxruntime with torch on held-out data and raises
    ParityError when they disagree, so a model that fails parity is never
    written to the repository.
    """
    module.eval()
    with tempfile.TemporaryDirectory() as scratch:
        candidate = Path(scratch) / "model.onnx"
        with warnings.catch_warnings():
            # The TorchScript exporter (dynamo=False, which needs no onnxscript) announces
            # its deprecation and traces data-dependent branches in transformers' code; the
            # parity check below is what decides whether the export is right.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                example,
                str(candidate),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
            )
        onnx.checker.check_model(str(candidate))
        report = check(cpu_session(candidate))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(candidate), target)
    return report


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@dataclass
class BatchMeasurement:
    batch_size: int
    items_per_second: float
    latency_ms: float


def measure_batch_sizes(
    session: ort.InferenceSession,
    make_feeds: Callable[[int], dict[str, np.ndarray]],
    sizes: Sequence[int],
    seconds_per_size: float = 0.6,
    rounds: int = 3,
) -> list[BatchMeasurement]:
    """onnxruntime's own throughput at each batch size.

    Sizes are measured in interleaved rounds and each keeps its best round's
    median: on a shared machine interference only ever slows a run down, so
    the best round is the most repeatable figure.
    """
    feeds = {size: make_feeds(size) for size in sizes}
    for size in sizes:
        session.run(None, feeds[size])  # warm-up: the first run at a shape allocates
    best: dict[int, float] = {}
    for _ in range(rounds):
        for size in sizes:
            timings: list[float] = []
            deadline = time.perf_counter() + seconds_per_size / rounds
            while time.perf_counter() < deadline or len(timings) < 3:
                started = time.perf_counter()
                session.run(None, feeds[size])
                timings.append(time.perf_counter() - started)
            median = float(np.median(timings))
            best[size] = min(best.get(size, median), median)
    return [BatchMeasurement(size, size / best[size], best[size] * 1000) for size in sizes]


@dataclass(frozen=True)
class BatchingChoice:
    max_batch_size: int
    preferred_batch_size: int


def choose_batching(
    measurements: Sequence[BatchMeasurement], within: float = 0.9
) -> BatchingChoice:
    """Batch sizes for config.pbtxt from onnxruntime's measured throughput.

    Every size within `within` of the best throughput is worth running; the
    largest of them caps a batch (beyond it latency grows for less throughput)
    and the smallest is where a batch already pays, so the batcher need not
    wait for more. On a CPU where batching gains nothing, the preferred size
    is 1 and requests are run as they come.
    """
    best = max(m.items_per_second for m in measurements)
    good = [m.batch_size for m in measurements if m.items_per_second >= within * best]
    return BatchingChoice(max(good), min(good))


def measurement_table(measurements: Sequence[BatchMeasurement]) -> str:
    lines = ["| batch size | items/s | latency (ms) |", "| ---: | ---: | ---: |"]
    lines += [
        f"| {m.batch_size} | {m.items_per_second:,.0f} | {m.latency_ms:.2f} |" for m in measurements
    ]
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
