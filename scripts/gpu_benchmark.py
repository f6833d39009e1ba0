"""GPU benchmark: the server on CUDA against onnxruntime-CUDA in this process.

    python scripts/gpu_benchmark.py                    # ResNet-18 and MiniLM, ~2 minutes
    python scripts/gpu_benchmark.py --models resnet18 --concurrency 1 64 --seconds 6

For each model, in one run on one machine:
  * raw onnxruntime with the CUDA provider (the server's provider options), at
    batch sizes 1..128: throughput at batch 1 and at the best batch;
  * the server (`python -m service serve`, KIND_GPU, dynamic batching) driven by
    perf_analyzer (or the Python client when perf_analyzer cannot run) at each
    concurrency: throughput, p50, p99;
  * the transport's ceiling: the same server with the inference work taken out
    (scripts/grpc_ceiling.py answers each request with a cached response of
    the real size), with the same client and concurrency;
  * the first request at batch sizes the server has not run yet, with warm-up
    off and on, against the same request repeated (the first-request penalty).
It prints a table with the ratios the GPU issue sets as targets (server at high
concurrency >= 85% of raw best batch and >= 5x raw batch 1) and writes
<output>/gpu-results.json. Raw and server runs alternate within each round;
medians of --repeats rounds are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402  (the CPU benchmark's server runner and load generators)

from service.placement import GpuDefaults, cuda_options  # noqa: E402

SOURCES = ROOT / ".bench" / "sources"
# name -> inputs (name -> (datatype, per-request shape)), server max_batch_size
MODELS: dict[str, dict[str, Any]] = {
    "resnet18": {"inputs": {"image": ("FP32", (3, 224, 224))}, "max_batch": 128},
    "minilm": {
        "inputs": {n: ("INT64", (128,)) for n in ("input_ids", "attention_mask", "token_type_ids")},
        "max_batch": 128,
    },
}
SIZES = [1, 2, 4, 8, 16, 32, 64, 128]  # raw batch sizes swept (--raw-sizes)
# --device cpu: the same flow on the CPU provider, to try this script where there is no GPU.
DEVICE = {"kind": "KIND_GPU", "provider": "CUDAExecutionProvider"}
FIRST_SIZES = (3, 5, 7, 11)  # batch sizes the first-request test sends, each once new


@dataclass
class Row:
    model: str
    raw_batch1: float
    raw_best: float
    raw_best_batch: int
    raw_batch1_p99_ms: float
    concurrency: int
    client: str
    server: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    ceiling: float
    ceiling_p99_ms: float

    @property
    def of_best(self) -> float:
        return self.server / self.raw_best

    @property
    def over_batch1(self) -> float:
        return self.server / self.raw_batch1

    @property
    def of_ceiling(self) -> float:
        return self.server / self.ceiling


def onnx_path(name: str) -> Path:
    target = SOURCES / name / "1" / "model.onnx"
    if target.exists():
        return target
    if name == "resnet18":
        from models import benchmark_models

        return benchmark_models.export("resnet18", SOURCES)
    embedded = ROOT / "models" / "repository" / "minilm" / "1" / "model.onnx"
    if not embedded.exists():
        raise SystemExit("MiniLM is not built: run `python -m models build` first")
    return embedded


def feeds(name: str, rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    arrays = {}
    for input_name, (datatype, shape) in MODELS[name]["inputs"].items():
        if datatype == "FP32":
            arrays[input_name] = rng.random((rows, *shape), dtype=np.float32)
        elif input_name == "input_ids":
            arrays[input_name] = rng.integers(1000, 2000, (rows, *shape)).astype(np.int64)
        elif input_name == "attention_mask":
            arrays[input_name] = np.ones((rows, *shape), np.int64)
        else:
            arrays[input_name] = np.zeros((rows, *shape), np.int64)
    return arrays


class RawCuda:
    """onnxruntime with the CUDA provider and the server's options, plain run() on numpy.

    Plain run() on host arrays, as an application calling onnxruntime would: each run
    copies its inputs to the GPU and its outputs back, as the server must too.
    """

    def __init__(self, name: str, onnx: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        wanted = DEVICE["provider"]
        settings = cuda_options(0, {}, GpuDefaults()) if wanted.startswith("CUDA") else {}
        self.session = ort.InferenceSession(str(onnx), options, providers=[(wanted, settings)])
        if self.session.get_providers()[0] != wanted:
            raise SystemExit(f"onnxruntime did not start {wanted}: {self.session.get_providers()}")
        self.name = name
        self.data = {size: feeds(name, size) for size in SIZES}

    def rate(self, rows: int, seconds: float) -> tuple[float, float]:
        """Rows per second and p99 latency (ms) of back-to-back runs at one batch size."""
        data = self.data[rows]
        for _ in range(3):
            self.session.run(None, data)
        latencies: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or len(latencies) < 5:
            begin = time.perf_counter()
            self.session.run(None, data)
            latencies.append(time.perf_counter() - begin)
        elapsed = time.perf_counter() - started
        return rows * len(latencies) / elapsed, float(np.percentile(latencies, 99)) * 1000

    def sweep(self, seconds: float) -> dict[int, float]:
        return {size: self.rate(size, seconds)[0] for size in SIZES}


def config_text(name: str, preferred: int) -> str:
    spec = MODELS[name]
    inputs = ",\n".join(
        f'  {{ name: "{n}" data_type: TYPE_{t} dims: [ {", ".join(str(d) for d in shape)} ] }}'
        for n, (t, shape) in spec["inputs"].items()
    )
    if name == "minilm":  # variable length, as clients send it; this benchmark sends 128
        inputs = inputs.replace("dims: [ 128 ]", "dims: [ -1 ]")
    cut = f" preferred_batch_size: [ {preferred} ]" if preferred else ""
    return (
        f'name: "{name}"\nmax_batch_size: {spec["max_batch"]}\ninput [\n{inputs}\n]\n'
        f"dynamic_batching {{ max_queue_delay_microseconds: 2000{cut} }}\n"
        # Two instances: one batch is copied and formed while the other computes.
        f"instance_group [ {{ count: 2 kind: {DEVICE['kind']} }} ]\n"
    )


def write_repository(folder: Path, names: list[str], preferred: dict[str, int]) -> Path:
    for name in names:
        (folder / name / "1").mkdir(parents=True, exist_ok=True)
        target = folder / name / "1" / "model.onnx"
        if not target.exists():  # the server refuses symlinks that leave the repository
            try:
                os.link(onnx_path(name), target)
            except OSError:
                shutil.copy(onnx_path(name), target)
        (folder / name / "config.pbtxt").write_text(config_text(name, preferred.get(name, 0)))
    return folder


def require_ready(server: benchmark.Server, names: list[str]) -> None:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.url) as client:
        for name in names:
            if not client.is_model_ready(name):
                index = client.get_model_repository_index(as_json=True)["models"]
                reason = next((m.get("reason", "") for m in index if m["name"] == name), "")
                raise SystemExit(f"the server could not load {name}: {reason}")


def serve_load(
    server: benchmark.Server,
    name: str,
    concurrency: int,
    seconds: float,
    client_flags: list[str] | None = None,
) -> tuple[benchmark.Point, str]:
    benchmark.FIXED_MODELS[name] = {"inputs": MODELS[name]["inputs"], "max_batch": 1}
    point = benchmark.measure(
        server, name, "batching", concurrency, seconds, "perf_analyzer", None, client_flags
    )
    if point is not None:
        return point, "perf_analyzer"
    if client_flags:
        raise SystemExit(f"perf_analyzer failed with {client_flags} (no fallback client for them)")
    point = benchmark.measure(server, name, "batching", concurrency, seconds, "python", None)
    assert point is not None
    return point, "python"


def first_requests(name: str, warmup: str) -> dict[str, float]:
    """Latency of the first request at new batch sizes vs the same request repeated."""
    import tritonclient.grpc as grpcclient

    with tempfile.TemporaryDirectory() as scratch:
        repository = write_repository(Path(scratch), [name], {})
        server = benchmark.Server(repository, metrics=False, extra=["--warmup", warmup])
        try:
            require_ready(server, [name])
            client = grpcclient.InferenceServerClient(server.url)
            first: list[float] = []
            again: list[float] = []
            for rows in FIRST_SIZES:
                inputs = []
                for input_name, array in feeds(name, rows).items():
                    datatype = MODELS[name]["inputs"][input_name][0]
                    tensor = grpcclient.InferInput(input_name, list(array.shape), datatype)
                    tensor.set_data_from_numpy(array)
                    inputs.append(tensor)
                for bucket in (first, *([again] * 5)):
                    started = time.perf_counter()
                    client.infer(name, inputs)
                    bucket.append((time.perf_counter() - started) * 1000)
            client.close()
        finally:
            server.stop()
    steady = statistics.median(again)
    return {"first_ms_max": max(first), "steady_ms_median": steady}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results")
    parser.add_argument(
        "--device",
        choices=["gpu", "cpu"],
        default="gpu",
        help="cpu: run the same flow on the CPU provider (a dry run where there is no GPU)",
    )
    parser.add_argument("--raw-sizes", nargs="+", type=int, default=SIZES)
    parser.add_argument(
        "--server-args",
        default="",
        help="extra server flags, one string (e.g. '--no-cuda-io-binding'), given to the "
        "measured server and to the transport ceiling alike",
    )
    parser.add_argument(
        "--client-args",
        default="",
        help="extra perf_analyzer flags, one string (e.g. '--shared-memory system "
        "--output-shared-memory-size 4096'; give the server --allow-shared-memory)",
    )
    parser.add_argument("--skip-first-request", action="store_true")
    options = parser.parse_args()
    SIZES[:] = sorted(set(options.raw_sizes) | {1})
    if options.device == "cpu":
        DEVICE.update(kind="KIND_CPU", provider="CPUExecutionProvider")

    for name in list(options.models):
        try:
            onnx_path(name)
        except Exception as error:  # e.g. no torch to export ResNet-18: measure the rest
            print(f"skipping {name}: {error}", file=sys.stderr)
            options.models.remove(name)
    raws = {name: RawCuda(name, onnx_path(name)) for name in options.models}
    sweeps = {name: raws[name].sweep(options.seconds / 4) for name in options.models}
    preferred = {}
    for name, sweep in sweeps.items():
        best = max(sweep, key=lambda size: sweep[size])
        preferred[name] = best if best <= MODELS[name]["max_batch"] else 0
        table = ", ".join(f"b{size} {rate:,.0f}/s" for size, rate in sweep.items())
        print(f"raw CUDA {name}: {table}", file=sys.stderr)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch:
        repository = write_repository(Path(scratch), options.models, preferred)
        server_args = shlex.split(options.server_args)
        client_flags = shlex.split(options.client_args)
        server = benchmark.Server(repository, extra=server_args)
        ceiling = benchmark.Server(
            repository,
            metrics=False,
            extra=["--warmup", "off", *server_args],
            entry=[str(ROOT / "scripts" / "grpc_ceiling.py")],
        )
        try:
            require_ready(server, options.models)
            require_ready(ceiling, options.models)
            for name in options.models:
                best_batch = preferred[name] or max(sweeps[name], key=lambda s: sweeps[name][s])
                for concurrency in options.concurrency:
                    samples: dict[str, list[float]] = {
                        k: []
                        for k in (
                            "b1",
                            "best",
                            "p99b1",
                            "server",
                            "p50",
                            "p99",
                            "batch",
                            "top",
                            "p99top",
                        )
                    }
                    client = "python"
                    for _ in range(options.repeats):
                        rate1, p99_1 = raws[name].rate(1, options.seconds / 2)
                        best_rate, _ = raws[name].rate(best_batch, options.seconds / 2)
                        before = benchmark.server_side(server.url, name)
                        point, client = serve_load(
                            server, name, concurrency, options.seconds, client_flags
                        )
                        after = benchmark.server_side(server.url, name)
                        phases = benchmark.per_batch(before, after)
                        print(f"{name} c={concurrency} server:{phases}", file=sys.stderr)
                        top, _ = serve_load(ceiling, name, concurrency, options.seconds)
                        for key, value in (
                            ("b1", rate1),
                            ("best", best_rate),
                            ("p99b1", p99_1),
                            ("server", point.throughput),
                            ("p50", point.p50_ms),
                            ("p99", point.p99_ms),
                            ("batch", point.mean_batch),
                            ("top", top.throughput),
                            ("p99top", top.p99_ms),
                        ):
                            samples[key].append(value)
                    med = {k: statistics.median(v) for k, v in samples.items()}
                    row = Row(
                        name,
                        med["b1"],
                        med["best"],
                        best_batch,
                        med["p99b1"],
                        concurrency,
                        client,
                        med["server"],
                        med["p50"],
                        med["p99"],
                        med["batch"],
                        med["top"],
                        med["p99top"],
                    )
                    rows.append(row)
                    print(
                        f"{name} c={concurrency}: server {row.server:,.0f}/s "
                        f"({row.of_best:.0%} of raw best; transport ceiling {row.ceiling:,.0f}/s)",
                        file=sys.stderr,
                    )
        finally:
            server.stop()
            ceiling.stop()

    penalties = {
        name: {mode: first_requests(name, mode) for mode in ("off", "gpu")}
        for name in ([] if options.skip_first_request else options.models)
    }
    report(rows, penalties, options.output, options.server_args)
    return 0


def report(
    rows: list[Row],
    penalties: dict[str, dict[str, dict[str, float]]],
    output: Path,
    server_args: str,
) -> None:
    import onnxruntime as ort

    lines = [
        f"GPU benchmark, onnxruntime {ort.__version__}, {describe_gpu()}, "
        f"server flags: {server_args or 'defaults'}",
        "",
        "| model | concurrency | client | server inf/s | p50 ms | p99 ms | mean batch | "
        "raw b1 inf/s | raw best inf/s (batch) | server / raw best | server / raw b1 | "
        "transport ceiling inf/s (p99 ms) | server / ceiling |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.concurrency} | {r.client} | {r.server:,.0f} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.mean_batch:.1f} | {r.raw_batch1:,.0f} | "
            f"{r.raw_best:,.0f} ({r.raw_best_batch}) | {r.of_best:.0%} | {r.over_batch1:.1f}x | "
            f"{r.ceiling:,.0f} ({r.ceiling_p99_ms:.1f}) | {r.of_ceiling:.0%} |"
        )
    if penalties:
        lines += ["", "first request at a new batch size (max over sizes 3, 5, 7, 11) vs repeated:"]
    for name, modes in penalties.items():
        for mode, figures in modes.items():
            lines.append(
                f"  {name} warm-up {mode:>3}: first {figures['first_ms_max']:.1f} ms, "
                f"repeated {figures['steady_ms_median']:.1f} ms "
                f"({figures['first_ms_max'] / figures['steady_ms_median']:.1f}x)"
            )
    lines += ["", "targets (highest concurrency):"]
    for name in dict.fromkeys(r.model for r in rows):
        top = max((r for r in rows if r.model == name), key=lambda r: r.concurrency)
        lines.append(
            f"  {name}: {top.of_best:.0%} of raw best batch (target >= 85%), "
            f"{top.over_batch1:.1f}x raw batch 1 (target >= 5x); the transport alone "
            f"allows {top.ceiling / top.raw_best:.0%} of raw best, "
            f"{top.ceiling / top.raw_batch1:.1f}x raw batch 1"
        )
    text = "\n".join(lines)
    print(text)
    output.mkdir(parents=True, exist_ok=True)
    (output / "gpu-results.txt").write_text(text + "\n")
    (output / "gpu-results.json").write_text(
        json.dumps(
            {
                "rows": [asdict(r) for r in rows],
                "first_request": penalties,
                "gpu": describe_gpu(),
                "server_args": server_args,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )


def describe_gpu() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return f"{name if isinstance(name, str) else name.decode()}, driver {driver}"
    except Exception as error:  # a report without the card's name is still a report
        return f"GPU unknown ({error})"


if __name__ == "__main__":
    raise SystemExit(main())
