"""The two load generators of the benchmarks: perf_analyzer (C++) and a Python asyncio client.

Both run a closed loop of K concurrent requests against one model for a fixed
time and report throughput and latency percentiles; neither knows which
server it talks to.
"""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# name -> (datatype, per-request shape); a -1 dim is a sequence length.
InputSpec = dict[str, tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class Load:
    """What a client measured: completed requests per second and latency in milliseconds."""

    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    errors: int = 0


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if len(values) else float("nan")


def feeds(inputs: InputSpec, rows: int, length: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Request tensors: random floats, token ids in [1000, 2000), masks of ones."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for name, (datatype, shape) in inputs.items():
        full = (rows, *(length if d == -1 else d for d in shape))
        if datatype == "INT64":
            if name == "attention_mask":
                arrays[name] = np.ones(full, np.int64)
            elif name == "input_ids":
                arrays[name] = rng.integers(1000, 2000, full).astype(np.int64)
            else:
                arrays[name] = np.zeros(full, np.int64)
        else:
            arrays[name] = rng.random(full, dtype=np.float32)
    return arrays


def input_maker(inputs: InputSpec, lengths: list[int] | None) -> Callable[[int, int], list[Any]]:
    """Per (worker, counter): the tritonclient inputs of one request (cached per length)."""
    import tritonclient.grpc.aio as aioclient

    cache: dict[int, list[Any]] = {}

    def make(worker: int, counter: int) -> list[Any]:
        length = 128 if lengths is None else lengths[(worker * 7919 + counter) % len(lengths)]
        if length not in cache:
            made = []
            for name, array in feeds(inputs, 1, length).items():
                tensor = aioclient.InferInput(name, list(array.shape), inputs[name][0])
                tensor.set_data_from_numpy(array)
                made.append(tensor)
            cache[length] = made
        return cache[length]

    return make


async def _python_load(
    url: str, model: str, concurrency: int, seconds: float, make: Callable[[int, int], list[Any]]
) -> tuple[list[float], int]:
    import tritonclient.grpc.aio as aioclient

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(client: aioclient.InferenceServerClient, index: int) -> None:
        nonlocal errors
        counter = 0
        while time.perf_counter() < stop_at:
            request = make(index, counter)
            counter += 1
            started = time.perf_counter()
            try:
                await client.infer(model, request)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    async with aioclient.InferenceServerClient(url) as client:
        await asyncio.gather(*(worker(client, i) for i in range(concurrency)))
    return latencies, errors


def python_load(
    url: str,
    model: str,
    concurrency: int,
    seconds: float,
    inputs: InputSpec,
    lengths: list[int] | None = None,
) -> Load:
    """tritonclient.grpc.aio, `concurrency` closed-loop workers on one channel."""
    latencies, errors = asyncio.run(
        _python_load(url, model, concurrency, seconds, input_maker(inputs, lengths))
    )
    return Load(
        len(latencies) / seconds,
        percentile(latencies, 50),
        percentile(latencies, 90),
        percentile(latencies, 99),
        float(np.mean(latencies)) * 1000 if latencies else float("nan"),
        errors,
    )


def perf_analyzer_binary() -> Path | None:
    binary = Path(os.environ.get("PERF_ANALYZER", Path(sys.executable).parent / "perf_analyzer"))
    return binary if binary.exists() else None


def perf_analyzer(
    url: str,
    model: str,
    concurrency: int,
    seconds: float,
    shapes: dict[str, int] | None = None,
    extra: list[str] | None = None,
) -> Load | None:
    """perf_analyzer's closed loop: three windows of seconds/3, no stability gate.

    `shapes`: lengths of variable dims, per input (sent as zeros); `extra`: more of
    perf_analyzer's flags. None if perf_analyzer is not installed or fails.
    """
    binary = perf_analyzer_binary()
    if binary is None:
        return None
    # perf_analyzer links libcudart.so.12 even without a GPU: the PyPI runtime carries it.
    library_path = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    try:
        import nvidia.cuda_runtime

        library_path.append(str(Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"))
    except ImportError:
        pass
    environment = {**os.environ, "LD_LIBRARY_PATH": ":".join(library_path)}
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.csv"
        command = [
            str(binary),
            "-m",
            model,
            # Every benchmark model is version 1; a server that answers without counting
            # (grpc_ceiling.py) leaves perf_analyzer nothing to infer it from.
            "-x",
            "1",
            "-u",
            url,
            "-i",
            "grpc",
            "-b",
            "1",
            "--concurrency-range",
            str(concurrency),
            "-p",
            str(int(seconds * 1000 / 3)),
            # Three windows, no stability gate: on a shared 2-core machine the gate fails
            # more often than it helps; the median of rounds is ours.
            "-r",
            "3",
            "-s",
            "100",
            "-f",
            str(report),
        ]
        command += extra or []
        if shapes:
            command += ["--input-data", "zero"]
            for name, length in shapes.items():
                command += ["--shape", f"{name}:{length}"]
        result = subprocess.run(
            command,
            env=environment,
            capture_output=True,
            text=True,
            timeout=seconds * 10 + 120,
            check=False,
        )
        if result.returncode != 0 or not report.exists():
            print(
                f"  perf_analyzer failed on {model} at {concurrency}: "
                f"{(result.stdout + result.stderr)[-300:]}",
                file=sys.stderr,
            )
            return None
        row = next(csv.DictReader(report.open()))
    return Load(
        float(row["Inferences/Second"]),
        float(row["p50 latency"]) / 1000,
        float(row["p90 latency"]) / 1000,
        float(row["p99 latency"]) / 1000,
        # The CSV has no mean latency (it splits it into parts only for servers that report
        # statistics); in a closed loop it is the concurrency over the throughput.
        1000 * concurrency / max(float(row["Inferences/Second"]), 1e-9),
    )
