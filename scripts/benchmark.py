"""Benchmark: the server against onnxruntime itself, with and without dynamic batching.

    python scripts/benchmark.py                      # everything, ~10 minutes on 2 cores
    python scripts/benchmark.py --models mnist_cnn --concurrency 1 32 --seconds 4

For each model it measures, in one run on one machine:
  * raw onnxruntime in this process, at its best batch size and thread count;
  * the server with dynamic batching (`<model>`) and the same server running
    one request per session.run (`<model>_single`, the per-request baseline),
    driven over gRPC by K concurrent clients: perf_analyzer where it runs
    (fixed shapes) and a Python asyncio load generator (always; the only one
    for mixed-length text).
It prints a table (throughput, p50/p90/p99, mean formed batch size, padding
waste, ratio to raw), writes bench-results/results.json and draws
bench-results/benchmark.png. Client and server share the machine's cores, as
the targets in the README assume. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CACHE = ROOT / ".bench"
MAX_DELAY_US = 5000  # the condition: a lone request must not wait for it

# name -> (inputs: name -> (dtype, per-request shape), max_batch_size, padding)
FIXED_MODELS: dict[str, dict[str, Any]] = {
    # Small models run with one onnxruntime thread in the server (both modes): a second
    # thread's wake-ups cost more than it computes, and it takes the event loop's core.
    "digits_cnn": {"inputs": {"pixels": ("FP32", (1, 8, 8))}, "max_batch": 64, "threads": 1},
    "mnist_cnn": {"inputs": {"image": ("FP32", (1, 28, 28))}, "max_batch": 64, "threads": 1},
    "resnet18": {"inputs": {"image": ("FP32", (3, 224, 224))}, "max_batch": 16},
    "minilm": {
        "inputs": {n: ("INT64", (128,)) for n in ("input_ids", "attention_mask", "token_type_ids")},
        "max_batch": 16,
        "padding": "input_ids:0, attention_mask:0, token_type_ids:0",
    },
}
MIXED = "minilm_mixed"  # MiniLM with lengths 16..128, Python client only


@dataclass
class Point:
    model: str
    mode: str  # batching | single
    client: str  # python | perf_analyzer
    concurrency: int
    throughput: float  # inferences/s
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float = 0.0
    padding_waste: float = 0.0
    errors: int = 0
    ratio_to_raw: float = 0.0


@dataclass
class Raw:
    model: str
    best_items_per_second: float
    batch_size: int
    threads: int
    table: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------- repository ---


def config_text(name: str, spec: dict[str, Any], batching: bool, preferred: int = 0) -> str:
    inputs = ",\n".join(
        f'  {{ name: "{n}" data_type: TYPE_{t} dims: [ {", ".join(str(d) for d in shape)} ] }}'
        for n, (t, shape) in spec["inputs"].items()
    )
    if name.startswith("minilm"):
        inputs = inputs.replace("dims: [ 128 ]", "dims: [ -1 ]")
    lines = [f'name: "{name}"', f"max_batch_size: {spec['max_batch']}", f"input [\n{inputs}\n]"]
    if batching:
        cut = f" preferred_batch_size: [ {preferred} ]" if preferred else ""
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {MAX_DELAY_US}{cut} }}")
    if spec.get("padding"):
        lines.append(
            f'parameters {{ key: "padding" value: {{ string_value: "{spec["padding"]}" }} }}'
        )
    if spec.get("threads"):
        threads = spec["threads"]
        lines.append(
            f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{threads}" }} }}'
        )
    lines.append("instance_group [ { count: 1 kind: KIND_CPU } ]")
    return "\n".join(lines) + "\n"


def prepare_sources(models: list[str]) -> None:
    """<cache>/sources/<model>/1/model.onnx for every model to measure."""
    from models import benchmark_models

    sources = CACHE / "sources"
    for name in {m.replace("_mixed", "") for m in models}:
        onnx = sources / name / "1" / "model.onnx"
        if onnx.exists():
            continue
        if name in ("mnist_cnn", "resnet18"):
            benchmark_models.export(name, sources)
        elif name == "minilm" and (ROOT / "models/repository/minilm/1/model.onnx").exists():
            onnx.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / "models/repository/minilm/1/model.onnx", onnx)
        elif name == "minilm":
            from models import minilm

            minilm.export(onnx)
        else:
            onnx.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f"models/repository/{name}/1/model.onnx", onnx)


def write_repository(models: list[str], raws: dict[str, Raw]) -> Path:
    """Each model twice: batching (`preferred_batch_size` = onnxruntime's best measured batch
    size) and one request per run (`<model>_single`, the per-request baseline)."""
    repository = CACHE / "repository"
    shutil.rmtree(repository, ignore_errors=True)
    for name in {m.replace("_mixed", "") for m in models}:
        onnx = CACHE / "sources" / name / "1" / "model.onnx"
        spec = FIXED_MODELS[name]
        preferred = raws[name].batch_size if name in raws else 0
        for suffix, batching in (("", True), ("_single", False)):
            folder = repository / f"{name}{suffix}"
            (folder / "1").mkdir(parents=True)
            os.link(onnx, folder / "1" / "model.onnx")
            (folder / "config.pbtxt").write_text(
                config_text(f"{name}{suffix}", spec, batching, preferred)
            )
    return repository


# ---------------------------------------------------------------- raw onnxruntime ---


def feeds(name: str, rows: int, length: int = 128) -> dict[str, np.ndarray]:
    spec = FIXED_MODELS[name]
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for input_name, (dtype, shape) in spec["inputs"].items():
        if dtype == "INT64":
            shape = (length,)
            arrays[input_name] = (
                np.ones((rows, *shape), np.int64)
                if input_name == "attention_mask"
                else rng.integers(1000, 2000, (rows, *shape)).astype(np.int64)
                if input_name == "input_ids"
                else np.zeros((rows, *shape), np.int64)
            )
        else:
            arrays[input_name] = rng.random((rows, *shape), dtype=np.float32)
    return arrays


def measure_raw(name: str, onnx: Path, seconds: float) -> Raw:
    import onnxruntime as ort

    best = Raw(name, 0.0, 0, 0)
    sizes = [1, 2, 4, 8, 16, 32, 64]
    for threads in (1, 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        for size in sizes:
            if size > FIXED_MODELS[name]["max_batch"]:
                break
            data = feeds(name, size)
            session.run(None, data)
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds / len(sizes) or count < 2:
                session.run(None, data)
                count += 1
            rate = count * size / (time.perf_counter() - started)
            best.table.append({"threads": threads, "batch": size, "items_per_second": rate})
            if rate > best.best_items_per_second:
                best.best_items_per_second, best.batch_size, best.threads = rate, size, threads
    return best


_RAW_SESSIONS: dict[tuple[str, int], Any] = {}


def raw_at(name: str, onnx: Path, best: Raw, seconds: float) -> float:
    """onnxruntime's throughput at the best setting found, measured again now."""
    import onnxruntime as ort

    key = (name, best.threads)
    if key not in _RAW_SESSIONS:
        options = ort.SessionOptions()
        options.intra_op_num_threads = best.threads
        options.log_severity_level = 3
        _RAW_SESSIONS[key] = ort.InferenceSession(
            str(onnx), options, providers=["CPUExecutionProvider"]
        )
    session = _RAW_SESSIONS[key]
    data = feeds(name, best.batch_size)
    session.run(None, data)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds / 2 or count < 2:
        session.run(None, data)
        count += 1
    return count * best.batch_size / (time.perf_counter() - started)


def median_point(points: list[Point]) -> Point:
    """The median of each figure over repeated rounds of one point."""
    first = points[0]

    def med(attribute: str) -> float:
        return float(np.median([getattr(p, attribute) for p in points]))

    return Point(
        first.model,
        first.mode,
        first.client,
        first.concurrency,
        med("throughput"),
        med("p50_ms"),
        med("p90_ms"),
        med("p99_ms"),
        med("mean_batch"),
        med("padding_waste"),
        int(sum(p.errors for p in points)),
    )


def mixed_lengths(count: int) -> list[int]:
    return [int(n) for n in np.random.default_rng(7).integers(16, 129, count)]


def measure_raw_one_by_one(onnx: Path, lengths: list[int]) -> Raw:
    """The mixed-length bar: the same requests, one session.run each, in-process."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    prepared = [feeds("minilm", 1, n) for n in lengths]
    session.run(None, prepared[0])
    started = time.perf_counter()
    for data in prepared:
        session.run(None, data)
    rate = len(prepared) / (time.perf_counter() - started)
    return Raw(MIXED, rate, 1, 0)


# ------------------------------------------------------------------------- server ---


def cpu_list(text: str) -> set[int]:
    """'0', '0,2' or '0-3' as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def split_cpus(server: str | None, client: str | None) -> tuple[set[int], set[int]]:
    """The server's and the client's CPUs: as given, else halves of ours."""
    available = sorted(os.sched_getaffinity(0))
    half = max(1, len(available) // 2)
    server_cpus = cpu_list(server) if server else set(available[:half])
    client_cpus = cpu_list(client) if client else set(available[half:] or available)
    return server_cpus, client_cpus


class Server:
    """`python -m service serve` on the benchmark repository, ports read from its log."""

    def __init__(
        self,
        repository: Path,
        metrics: bool = True,
        extra: list[str] | None = None,
        entry: list[str] | None = None,
        tree: Path = ROOT,
        cpus: set[int] | None = None,
    ) -> None:
        """`tree`: the checkout whose `service` runs; `cpus`: pin the server to these."""
        self.process = subprocess.Popen(
            [
                sys.executable,
                *(entry or ["-m", "service"]),
                "serve",
                "--model-repository",
                str(repository),
                "--grpc-host",
                "127.0.0.1",
                "--grpc-port",
                "0",
                "--metrics-host",
                "127.0.0.1",
                "--metrics-port",
                "0" if metrics else "-1",
                *(extra or []),
            ],
            cwd=tree,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )
        self.url = ""
        self.metrics = ""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            grpc_port = re.search(r"gRPC server listening on [\d.]+:(\d+)", line)
            metrics_port = re.search(r"metrics endpoint listening on (http://\S+)", line)
            if grpc_port:
                self.url = f"127.0.0.1:{grpc_port.group(1)}"
            if metrics_port:
                self.metrics = metrics_port.group(1)
            if "failed to load" in line:
                print(line.rstrip(), file=sys.stderr)
            if "server ready" in line:
                break
        if not self.url or (metrics and not self.metrics):
            raise RuntimeError("the server did not start")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for _ in self.process.stdout:
            pass

    def model_counters(self, model: str) -> dict[str, float]:
        if not self.metrics:
            return {}
        with urllib.request.urlopen(self.metrics) as page:
            text = page.read().decode()
        counters: dict[str, float] = {}
        for metric in (
            "inferences_total",
            "executions_total",
            "input_elements_total",
            "padded_elements_total",
        ):
            match = re.search(
                rf'^batchwise_{metric}{{model="{model}",version="1"}} (\S+)$', text, re.MULTILINE
            )
            counters[metric] = float(match.group(1)) if match else 0.0
        return counters

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


# ------------------------------------------------------------------- load ---


async def python_load(
    url: str, model: str, concurrency: int, seconds: float, make: Any
) -> tuple[list[float], int]:
    import tritonclient.grpc.aio as aioclient

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(client: aioclient.InferenceServerClient, index: int) -> None:
        nonlocal errors
        counter = 0
        while time.perf_counter() < stop_at:
            inputs = make(index, counter)
            counter += 1
            started = time.perf_counter()
            try:
                await client.infer(model, inputs)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    async with aioclient.InferenceServerClient(url) as client:
        await asyncio.gather(*(worker(client, i) for i in range(concurrency)))
    return latencies, errors


def input_maker(name: str, lengths: list[int] | None) -> Any:
    import tritonclient.grpc.aio as aioclient

    base = FIXED_MODELS[name.replace("_mixed", "")]
    cache: dict[int, list[Any]] = {}

    def make(worker: int, counter: int) -> list[Any]:
        length = 128 if lengths is None else lengths[(worker * 7919 + counter) % len(lengths)]
        if length not in cache:
            inputs = []
            for input_name, array in feeds(name.replace("_mixed", ""), 1, length).items():
                tensor = aioclient.InferInput(
                    input_name, list(array.shape), base["inputs"][input_name][0]
                )
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            cache[length] = inputs
        return cache[length]

    return make


def perf_analyzer(url: str, model: str, concurrency: int, seconds: float) -> Point | None:
    binary = Path(os.environ.get("PERF_ANALYZER", Path(sys.executable).parent / "perf_analyzer"))
    if not binary.exists():
        return None
    # perf_analyzer links libcudart.so.12 even without a GPU: the PyPI runtime carries it.
    library_path = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    try:
        import nvidia.cuda_runtime

        library_path.append(str(Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"))
    except ImportError:
        pass
    environment = {**os.environ, "LD_LIBRARY_PATH": ":".join(library_path)}
    base = model.replace("_single", "")
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.csv"
        command = [
            str(binary),
            "-m",
            model,
            "-x",  # every benchmark model is version 1; a server that answers without
            "1",  # counting (grpc_ceiling.py) leaves perf_analyzer nothing to infer it from
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
            # Three windows, no stability gate: on a shared 2-core machine the
            # gate fails more often than it helps; the median of runs is ours.
            "-r",
            "3",
            "-s",
            "100",
            "-f",
            str(report),
        ]
        if base == "minilm":
            command += ["--input-data", "zero"] + [
                arg for n in FIXED_MODELS["minilm"]["inputs"] for arg in ("--shape", f"{n}:128")
            ]
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
    return Point(
        model=base,
        mode="single" if model.endswith("_single") else "batching",
        client="perf_analyzer",
        concurrency=concurrency,
        throughput=float(row["Inferences/Second"]),
        p50_ms=float(row["p50 latency"]) / 1000,
        p90_ms=float(row["p90 latency"]) / 1000,
        p99_ms=float(row["p99 latency"]) / 1000,
    )


def server_side(url: str, model: str) -> dict[str, int]:
    """Cumulative batches, their rows and nanoseconds per phase, from ModelStatistics.

    Read from `batch_stats` (one count per execution): `inference_stats` adds each
    batch's durations once for every request in it, as Triton's does.
    """
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    phases = ("compute_input", "compute_infer", "compute_output")
    totals = dict.fromkeys(("batches", "rows", *phases), 0)
    for entry in stats.get("batch_stats", []):
        count = int(entry.get("compute_infer", {}).get("count", 0))
        totals["batches"] += count
        totals["rows"] += count * int(entry["batch_size"])
        for phase in phases:
            totals[phase] += int(entry.get(phase, {}).get("ns", 0))
    return totals


def per_batch(before: dict[str, int], after: dict[str, int]) -> str:
    """Mean batch and milliseconds per batch of each phase, between two snapshots."""
    delta = {key: after[key] - before[key] for key in after}
    batches = delta["batches"]
    if not batches:
        return ""
    return (
        f"  batch {delta['rows'] / batches:5.1f}  per batch: merge "
        f"{delta['compute_input'] / batches / 1e6:5.2f} ms  run "
        f"{delta['compute_infer'] / batches / 1e6:5.2f} ms  encode "
        f"{delta['compute_output'] / batches / 1e6:5.2f} ms"
    )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def measure(
    server: Server,
    name: str,
    mode: str,
    concurrency: int,
    seconds: float,
    client: str,
    lengths: list[int] | None,
) -> Point | None:
    served = name.replace("_mixed", "") + ("_single" if mode == "single" else "")
    warm = input_maker(name, lengths)
    asyncio.run(python_load(server.url, served, 1, 0.5, warm))  # warm-up: shapes, sessions
    before = server.model_counters(served)
    if client == "perf_analyzer":
        point = perf_analyzer(server.url, served, concurrency, seconds)
        if point is None:
            return None
    else:
        latencies, errors = asyncio.run(
            python_load(server.url, served, concurrency, seconds, input_maker(name, lengths))
        )
        point = Point(
            name,
            mode,
            "python",
            concurrency,
            len(latencies) / seconds,
            percentile(latencies, 50),
            percentile(latencies, 90),
            percentile(latencies, 99),
            errors=errors,
        )
    point.model = name
    after = server.model_counters(served)
    if not after:
        return point
    executions = after["executions_total"] - before["executions_total"]
    if executions:
        point.mean_batch = (after["inferences_total"] - before["inferences_total"]) / executions
    elements = after["input_elements_total"] - before["input_elements_total"]
    if elements:
        point.padding_waste = (
            after["padded_elements_total"] - before["padded_elements_total"]
        ) / elements
    return point


# ----------------------------------------------------------------- report ---


def report(points: list[Point], raws: dict[str, Raw], output: Path) -> None:
    for point in points:
        raw = raws.get(point.model)
        if raw and not point.ratio_to_raw:
            point.ratio_to_raw = point.throughput / raw.best_items_per_second
    header = (
        f"{'model':<13}{'mode':<9}{'client':<14}{'conc':>5}{'infer/s':>10}{'p50 ms':>9}"
        f"{'p90 ms':>9}{'p99 ms':>9}{'batch':>7}{'pad':>6}{'x raw':>7}{'err':>5}"
    )
    lines = [header, "-" * len(header)]
    for p in points:
        lines.append(
            f"{p.model:<13}{p.mode:<9}{p.client:<14}{p.concurrency:>5}"
            f"{p.throughput:>10.1f}{p.p50_ms:>9.2f}{p.p90_ms:>9.2f}{p.p99_ms:>9.2f}"
            f"{p.mean_batch:>7.1f}{p.padding_waste:>6.2f}{p.ratio_to_raw:>7.2f}"
            f"{p.errors:>5}"
        )
    lines.append("")
    for raw in raws.values():
        how = (
            "one by one" if raw.model == MIXED else f"batch {raw.batch_size}, {raw.threads} threads"
        )
        lines.append(
            f"raw onnxruntime {raw.model}: {raw.best_items_per_second:.1f} items/s ({how}; "
            "median of the rounds)"
        )
    lines += ["", *targets(points, raws)]
    text = "\n".join(lines)
    print(text)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(
        json.dumps(
            {
                "points": [asdict(p) for p in points],
                "raw": {k: asdict(v) for k, v in raws.items()},
                "machine": {"cpus": os.cpu_count()},
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
    (output / "results.txt").write_text(text + "\n")
    plot(points, output / "benchmark.png")


def _find(
    points: list[Point], model: str, mode: str, client: str, concurrency: int
) -> Point | None:
    return next(
        (
            p
            for p in points
            if (p.model, p.mode, p.client, p.concurrency) == (model, mode, client, concurrency)
        ),
        None,
    )


def targets(points: list[Point], raws: dict[str, Raw]) -> list[str]:
    """The issue's targets, checked against this run (ratios from one run)."""
    out = ["targets:"]
    clients = sorted({p.client for p in points})
    concurrencies = sorted({p.concurrency for p in points})
    high = max(concurrencies)
    for client in clients:
        for model in ("resnet18", "minilm"):
            best = max(
                (
                    p.ratio_to_raw
                    for p in points
                    if p.model == model
                    and p.client == client
                    and p.mode == "batching"
                    and p.concurrency >= 8
                ),
                default=None,
            )
            if best is not None:
                out.append(
                    f"  [{client}] {model}: throughput {best:.0%} of raw best at concurrency"
                    f" >= 8 (target >= 95%)"
                )
        batched = _find(points, "mnist_cnn", "batching", client, high)
        single = _find(points, "mnist_cnn", "single", client, high)
        if batched and single:
            out.append(
                f"  [{client}] mnist_cnn: {batched.throughput / single.throughput:.2f}x the "
                f"per-request baseline at concurrency {high} (target >= 2x)"
            )
        for model in sorted({p.model for p in points}):
            b1 = _find(points, model, "batching", client, 1)
            s1 = _find(points, model, "single", client, 1)
            if b1 and s1:
                out.append(
                    f"  [{client}] {model}: p50 at concurrency 1 is {b1.p50_ms / s1.p50_ms:.2f}"
                    f"x the per-request baseline's (target <= 1.1)"
                )
            bh = _find(points, model, "batching", client, high)
            if bh:
                out.append(
                    f"  [{client}] {model}: p99/p50 at concurrency {high} = "
                    f"{bh.p99_ms / bh.p50_ms:.2f} (target <= 1.5)"
                )
    mixed = [p for p in points if p.model == MIXED and p.mode == "batching"]
    if mixed and MIXED in raws:
        best = max(p.throughput for p in mixed)
        out.append(
            f"  {MIXED}: best {best:.1f} infer/s vs {raws[MIXED].best_items_per_second:.1f}"
            " one by one in-process (target: not below)"
        )
    return out


def plot(points: list[Point], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    models = sorted({p.model for p in points})
    figure, axes = plt.subplots(2, len(models), figsize=(4 * len(models), 7), squeeze=False)
    for column, model in enumerate(models):
        for (mode, client), style in (
            (("batching", "python"), "o-"),
            (("single", "python"), "o--"),
            (("batching", "perf_analyzer"), "s-"),
            (("single", "perf_analyzer"), "s--"),
        ):
            series = sorted(
                (p for p in points if (p.model, p.mode, p.client) == (model, mode, client)),
                key=lambda p: p.concurrency,
            )
            if not series:
                continue
            label = f"{mode} ({client})"
            xs = [p.concurrency for p in series]
            axes[0][column].plot(xs, [p.throughput for p in series], style, label=label)
            axes[1][column].plot(xs, [p.p99_ms for p in series], style, label=label)
        axes[0][column].set_title(model)
        axes[0][column].set_ylabel("inferences/s")
        axes[1][column].set_ylabel("p99 latency (ms)")
        axes[1][column].set_xlabel("concurrency")
        for row in (0, 1):
            axes[row][column].set_xscale("log", base=2)
            axes[row][column].grid(alpha=0.3)
        axes[0][column].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


# ------------------------------------------------------------ metrics cost ---


def metrics_cost(seconds: float, repeats: int, concurrency: int, client: str) -> None:
    """Throughput with metrics on (scraped every second) vs off, alternating rounds."""
    model = "mnist_cnn"
    prepare_sources([model])
    repository = write_repository([model], {})
    on, off = Server(repository, metrics=True), Server(repository, metrics=False)
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(1.0):
            with urllib.request.urlopen(on.metrics) as page:
                page.read()

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    rates: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for _ in range(repeats):
            for label, server in (("off", off), ("on", on)):
                point = measure(server, model, "batching", concurrency, seconds, client, None)
                if point is not None:
                    rates[label].append(point.throughput)
                    print(f"metrics {label}: {point.throughput:.1f}/s", file=sys.stderr)
    finally:
        stop.set()
        on.stop()
        off.stop()
    ratios = [a / b for a, b in zip(rates["on"], rates["off"], strict=False)]
    print(
        f"{model} batching, {client}, concurrency {concurrency}, {repeats} rounds: "
        f"metrics on {np.median(rates['on']):.1f}/s, off {np.median(rates['off']):.1f}/s, "
        f"on/off median of per-round ratios {np.median(ratios):.3f} "
        f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})"
    )


# ------------------------------------------------------------------- main ---


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=[*FIXED_MODELS, MIXED], choices=[*FIXED_MODELS, MIXED]
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument(
        "--clients",
        nargs="+",
        default=["perf_analyzer", "python"],
        choices=["perf_analyzer", "python"],
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds per point, alternating raw, per-request and batching; medians are reported",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results")
    parser.add_argument(
        "--metrics-cost",
        action="store_true",
        help="only measure throughput with metrics on vs off (MNIST CNN)",
    )
    options = parser.parse_args()
    if options.metrics_cost:
        metrics_cost(options.seconds, options.repeats, max(options.concurrency), options.clients[0])
        return 0

    prepare_sources(options.models)
    raws: dict[str, Raw] = {}
    lengths = mixed_lengths(512)
    for name in options.models:
        onnx = CACHE / "sources" / name.replace("_mixed", "") / "1" / "model.onnx"
        if name == MIXED:
            raws[name] = measure_raw_one_by_one(onnx, lengths[:64])
        else:
            raws[name] = measure_raw(name, onnx, seconds=options.seconds)
        print(f"raw {name}: {raws[name].best_items_per_second:.1f} items/s", file=sys.stderr)

    server = Server(write_repository(options.models, raws))
    points: list[Point] = []
    raw_samples: dict[str, list[float]] = {name: [] for name in options.models}
    try:
        for name in options.models:
            onnx = CACHE / "sources" / name.replace("_mixed", "") / "1" / "model.onnx"
            clients = ["python"] if name == MIXED else options.clients
            for client in clients:
                for concurrency in options.concurrency:
                    rounds: dict[str, list[Point]] = {"single": [], "batching": []}
                    ratios: list[float] = []
                    for _ in range(options.repeats):
                        # Raw onnxruntime at its best setting, then the two server sides,
                        # in every round: ratios come from measurements minutes apart at most.
                        raw_rate = (
                            measure_raw_one_by_one(onnx, lengths[:64]).best_items_per_second
                            if name == MIXED
                            else raw_at(name, onnx, raws[name], options.seconds)
                        )
                        raw_samples[name].append(raw_rate)
                        for mode in ("single", "batching"):
                            point = measure(
                                server,
                                name,
                                mode,
                                concurrency,
                                options.seconds,
                                client,
                                lengths if name == MIXED else None,
                            )
                            if point is not None:
                                rounds[mode].append(point)
                                if mode == "batching":
                                    ratios.append(point.throughput / raw_rate)
                    for mode, measured in rounds.items():
                        if not measured:
                            continue
                        point = median_point(measured)
                        if mode == "batching" and ratios:
                            point.ratio_to_raw = float(np.median(ratios))
                        points.append(point)
                        print(
                            f"{name} {mode} {client} c={concurrency}: "
                            f"{point.throughput:.1f}/s p50 {point.p50_ms:.2f} ms "
                            f"({len(measured)} runs)",
                            file=sys.stderr,
                        )
    finally:
        server.stop()
    for name, samples in raw_samples.items():
        if samples:
            raws[name].best_items_per_second = float(np.median(samples))
    report(points, raws, options.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
