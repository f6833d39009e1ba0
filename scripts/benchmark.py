"""Benchmark: this server against the one a user would write instead, and against onnxruntime.

    python scripts/benchmark.py        # every model, both clients, c 1/8/32, 3 rounds: ~40 min
    python scripts/benchmark.py --models mnist_cnn --concurrency 1 32 --seconds 4 --rounds 3

For each model (a 1x28x28 CNN, ResNet-18 on 3x224x224, MiniLM at 128 tokens)
it measures, on one machine in one run:
  * raw onnxruntime in this process at its best batch size and thread count
    (re-measured every round);
  * the naive server (naive_server.py: gRPC's sync server, one session.run per
    call, onnxruntime's default options), a separate process;
  * this server, default flags, on the model as a user configures it first
    (max_batch_size and dynamic_batching with a 5 ms max_queue_delay);
  * the same server on the model without dynamic batching (`batching off`, a
    secondary column), and for the CNN grpc_ceiling.py (this server answering
    from a cache: the bound gRPC Python's per-call cost sets).
Each is driven by perf_analyzer and by a Python tritonclient.grpc.aio client,
K closed-loop requests at a time. Within a round the servers take turns (the
order rotates each round); figures are medians of the rounds and every ratio
is the median of ratios taken within one round. Per request it reports the
server process's CPU time (from /proc) and where the time went (from each
server's ModelStatistics). Client and servers share the machine's cores.
Results: bench-results/results.txt and results.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_clients import Load, perf_analyzer, python_load  # noqa: E402
from bench_models import (  # noqa: E402
    MIXED,
    MODELS,
    Raw,
    measure_raw,
    mixed_lengths,
    onnx_path,
    prepare_sources,
    raw_at,
    raw_one_by_one,
    variable_shapes,
    write_repositories,
)
from bench_report import BEFORE, CEILING, NAIVE, OURS, SINGLE, Sample, summarize, write  # noqa: E402
from bench_servers import (  # noqa: E402  (other scripts use these through this module)
    NaiveServer,
    Phases,
    Server,
    per_batch,
    phases,
    server_side,
    split_cpus,
)

__all__ = [
    "FIXED_MODELS",
    "NaiveServer",
    "Phases",
    "Point",
    "Server",
    "measure",
    "per_batch",
    "perf_analyzer",
    "server_side",
    "split_cpus",
]

# The tables other benchmark scripts read: inputs and max_batch per model.
FIXED_MODELS: dict[str, dict[str, Any]] = {
    name: {"inputs": spec.inputs, "max_batch": spec.max_batch} for name, spec in MODELS.items()
}


@dataclass
class Point:
    """One server measured at one point (the interface gpu_benchmark.py uses)."""

    model: str
    mode: str  # batching | single
    client: str  # python | perf_analyzer
    concurrency: int
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float = 0.0
    padding_waste: float = 0.0
    errors: int = 0
    ratio_to_raw: float = 0.0


def _load(
    url: str,
    model: str,
    base: str,
    client: str,
    concurrency: int,
    seconds: float,
    lengths: list[int] | None,
    client_flags: list[str] | None = None,
) -> Load | None:
    inputs = FIXED_MODELS[base]["inputs"]
    if client == "perf_analyzer":
        shapes = variable_shapes(base) if base in MODELS else {}
        return perf_analyzer(url, model, concurrency, seconds, shapes, client_flags)
    return python_load(url, model, concurrency, seconds, inputs, lengths)


def measure(
    server: Server,
    name: str,
    mode: str,
    concurrency: int,
    seconds: float,
    client: str,
    lengths: list[int] | None,
    client_flags: list[str] | None = None,
) -> Point | None:
    """Load `name` (or `name_single`) on a running server; mean batch from its metrics.

    `client_flags`: more perf_analyzer flags (e.g. `--shared-memory system`)."""
    served = name + ("_single" if mode == "single" else "")
    _load(server.url, served, name, "python", 1, 0.5, lengths)  # warm-up: shapes, sessions
    before = server.model_counters(served)
    load = _load(server.url, served, name, client, concurrency, seconds, lengths, client_flags)
    if load is None:
        return None
    point = Point(
        name,
        mode,
        client,
        concurrency,
        load.throughput,
        load.p50_ms,
        load.p90_ms,
        load.p99_ms,
        errors=load.errors,
    )
    after = server.model_counters(served)
    if after:
        executions = after["executions_total"] - before["executions_total"]
        if executions:
            point.mean_batch = (after["inferences_total"] - before["inferences_total"]) / executions
        elements = after["input_elements_total"] - before["input_elements_total"]
        if elements:
            point.padding_waste = (
                after["padded_elements_total"] - before["padded_elements_total"]
            ) / elements
    return point


def metrics_cost(seconds: float, rounds: int, concurrency: int, client: str) -> None:
    """Throughput with metrics on (scraped every second) vs off, alternating rounds."""
    import threading
    import urllib.request

    model = "mnist_cnn"
    prepare_sources([model])
    repository, _ = write_repositories([model])
    on, off = Server(repository, metrics=True), Server(repository, metrics=False)
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(1.0):
            with urllib.request.urlopen(on.metrics) as page:
                page.read()

    threading.Thread(target=scrape, daemon=True).start()
    rates: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for _ in range(rounds):
            for label, server in (("off", off), ("on", on)):
                point = measure(server, model, "batching", concurrency, seconds, client, None)
                if point is not None:
                    rates[label].append(point.throughput)
    finally:
        stop.set()
        on.stop()
        off.stop()
    ratios = [a / b for a, b in zip(rates["on"], rates["off"], strict=False)]
    print(
        f"{model}, {client}, concurrency {concurrency}, {rounds} rounds: metrics on "
        f"{np.median(rates['on']):.1f}/s, off {np.median(rates['off']):.1f}/s, on/off median of "
        f"per-round ratios {np.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})"
    )


# ---------------------------------------------------------------- the comparison ---


def sample(
    kind: str,
    server: Server | NaiveServer,
    model: str,
    client: str,
    concurrency: int,
    seconds: float,
    round_number: int,
    raw: float,
    lengths: list[int] | None,
) -> Sample | None:
    served = model + ("_single" if kind == SINGLE else "")
    _load(server.url, served, model, "python", 1, 0.3, lengths)  # warm-up: shapes, sessions
    counted_before = phases(server.url, served)
    cpu_before, started = server.cpu_seconds(), time.perf_counter()
    load = _load(server.url, served, model, client, concurrency, seconds, lengths)
    cpu, elapsed = server.cpu_seconds() - cpu_before, time.perf_counter() - started
    if load is None:
        return None
    counted = phases(server.url, served) - counted_before
    if kind == CEILING:  # it answers from a cache and counts nothing: the client's rate
        counted = Phases()
    requests = counted.requests or load.throughput * elapsed
    return Sample(
        kind,
        model,
        client,
        concurrency,
        round_number,
        load,
        1000 * cpu / max(requests, 1),
        counted,
        raw,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["mnist_cnn", "resnet18", "minilm"], choices=list(MODELS)
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="per measurement (ResNet and MiniLM: twice this)"
    )
    parser.add_argument(
        "--clients",
        nargs="+",
        default=["perf_analyzer", "python"],
        choices=["perf_analyzer", "python"],
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per point; medians")
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip grpc_ceiling.py (the CNN's transport bound)"
    )
    parser.add_argument("--no-single", action="store_true", help="skip the batching-off column")
    parser.add_argument("--server-args", default="", help="extra flags for this server")
    parser.add_argument(
        "--against",
        type=Path,
        help="another checkout of this project (git worktree add DIR COMMIT): measured as "
        "'before', same repository and configs",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results")
    parser.add_argument(
        "--metrics-cost",
        action="store_true",
        help="only measure the CNN's throughput with metrics on vs off",
    )
    options = parser.parse_args()
    if options.metrics_cost:
        metrics_cost(options.seconds, options.rounds, max(options.concurrency), options.clients[0])
        return 0

    prepare_sources(options.models)
    ours_repository, naive_repository = write_repositories(options.models)
    lengths = mixed_lengths(512)
    raws: dict[str, Raw] = {}
    for model in options.models:
        if model == MIXED:
            raws[model] = Raw(model, raw_one_by_one(lengths[:64]), 1, 2)
        else:
            raws[model] = measure_raw(model, options.seconds)
        print(
            f"raw {model}: {raws[model].best_items_per_second:.1f} items/s "
            f"(batch {raws[model].batch_size}, {raws[model].threads} threads)",
            file=sys.stderr,
        )

    extra = options.server_args.split()
    servers: dict[str, Server | NaiveServer] = {
        OURS: Server(ours_repository, metrics=False, extra=extra),
        NAIVE: NaiveServer(naive_repository),
    }
    if options.against is not None:
        servers[BEFORE] = Server(ours_repository, metrics=False, tree=options.against.resolve())
    if not options.no_ceiling and "mnist_cnn" in options.models:
        servers[CEILING] = Server(
            ours_repository,
            metrics=False,
            extra=extra,
            entry=[str(ROOT / "scripts" / "grpc_ceiling.py")],
        )
    samples: list[Sample] = []
    try:
        for model in options.models:
            seconds = options.seconds * MODELS[model].heavy
            kinds = [OURS, NAIVE] + ([BEFORE] if BEFORE in servers else [])
            kinds += [] if options.no_single else [SINGLE]
            if model == "mnist_cnn" and CEILING in servers:
                kinds.append(CEILING)
            clients = ["python"] if model == MIXED else options.clients
            for client in clients:
                for concurrency in options.concurrency:
                    for round_number in range(options.rounds):
                        raw_rate = (
                            raw_one_by_one(lengths[:64])
                            if model == MIXED
                            else raw_at(model, raws[model], seconds / 2)
                        )
                        order = (
                            kinds[round_number % len(kinds) :] + kinds[: round_number % len(kinds)]
                        )
                        for kind in order:
                            server = servers[OURS] if kind == SINGLE else servers[kind]
                            got = sample(
                                kind,
                                server,
                                model,
                                client,
                                concurrency,
                                seconds,
                                round_number,
                                raw_rate,
                                lengths if model == MIXED else None,
                            )
                            if got is None:
                                continue
                            samples.append(got)
                            print(
                                f"{model} {client} c{concurrency} r{round_number} {kind}: "
                                f"{got.load.throughput:,.1f}/s p50 {got.load.p50_ms:.2f} ms "
                                f"cpu {got.cpu_ms:.3f} ms/req",
                                file=sys.stderr,
                            )
    finally:
        for server in servers.values():
            server.stop()
    rows = summarize(samples)
    for model, measured in raws.items():  # the median of the rounds' re-measurements
        rates = [s.raw for s in samples if s.model == model and s.raw]
        if rates:
            measured.best_items_per_second = float(np.median(rates))
    text = write(rows, samples, {m: asdict(r) for m, r in raws.items()}, options.output)
    print(text)
    for raw in raws.values():
        print(
            f"raw onnxruntime {raw.model}: {raw.best_items_per_second:,.1f} items/s (batch "
            f"{raw.batch_size}, {raw.threads} threads, {onnx_path(raw.model).name}; median of "
            "the rounds)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
