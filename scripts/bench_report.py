"""The benchmark's results: medians of the rounds, ratios to the naive server and to
onnxruntime, where a request's time goes, and the targets of the lean-path issue.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_clients import Load
from bench_servers import Phases

OURS, NAIVE, SINGLE, CEILING = "batchwise", "naive", "batching off", "gRPC ceiling"
BEFORE = "before"  # --against: another checkout of this server, the same configs


@dataclass
class Sample:
    """One server measured once at one model, client and concurrency."""

    server: str
    model: str
    client: str
    concurrency: int
    round: int
    load: Load
    cpu_ms: float  # the server process's CPU time per request
    phases: Phases  # what ModelStatistics counted meanwhile
    raw: float = 0.0  # raw onnxruntime's best this round, items/s

    @property
    def mean_batch(self) -> float:
        return self.phases.rows / self.phases.executions if self.phases.executions else 0.0


@dataclass
class Row:
    """Medians over the rounds of one server at one point; ratios are medians of
    ratios taken within a round, against the naive server of the same round."""

    server: str
    model: str
    client: str
    concurrency: int
    throughput: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float
    mean_batch: float
    errors: int
    rounds: int
    x_naive_throughput: float = 0.0
    x_naive_p50: float = 0.0
    x_naive_cpu: float = 0.0
    x_raw: float = 0.0
    # Mean microseconds per request by phase (empty when the server does not count).
    phases_us: dict[str, float] = field(default_factory=dict)


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return float(statistics.median(values)) if values else float("nan")


def _per_request_us(samples: Sequence[Sample]) -> dict[str, float]:
    """Median over rounds of each phase's mean per request, in microseconds."""
    counted = [s for s in samples if s.phases.requests]
    if not counted:
        return {}

    def each(part: Callable[[Phases], int]) -> float:
        return _median([part(s.phases) / s.phases.requests / 1000 for s in counted])

    total = each(lambda p: p.total_ns)
    parts = {
        "queue": each(lambda p: p.queue_ns),
        "merge": each(lambda p: p.merge_ns),
        "run": each(lambda p: p.run_ns),
        "split": each(lambda p: p.split_ns),
    }
    client = _median([s.load.mean_ms * 1000 for s in counted])
    return {
        **parts,
        "rest": max(total - sum(parts.values()), 0.0),
        "in_server": total,
        "outside": max(client - total, 0.0),
        "client_mean": client,
    }


def summarize(samples: list[Sample]) -> list[Row]:
    keys = sorted({(s.model, s.client, s.concurrency) for s in samples})
    rows = []
    for model, client, concurrency in keys:
        here = [
            s for s in samples if (s.model, s.client, s.concurrency) == (model, client, concurrency)
        ]
        naive = {s.round: s for s in here if s.server == NAIVE}
        for server in (OURS, BEFORE, NAIVE, SINGLE, CEILING):
            mine = [s for s in here if s.server == server]
            if not mine:
                continue
            paired = [(s, naive[s.round]) for s in mine if s.round in naive]
            rows.append(
                Row(
                    server,
                    model,
                    client,
                    concurrency,
                    _median([s.load.throughput for s in mine]),
                    _median([s.load.p50_ms for s in mine]),
                    _median([s.load.p99_ms for s in mine]),
                    _median([s.cpu_ms for s in mine]),
                    _median([s.mean_batch for s in mine]),
                    sum(s.load.errors for s in mine),
                    len(mine),
                    _median([s.load.throughput / n.load.throughput for s, n in paired]),
                    _median([s.load.p50_ms / n.load.p50_ms for s, n in paired]),
                    _median([s.cpu_ms / n.cpu_ms for s, n in paired]),
                    _median([s.load.throughput / s.raw for s in mine if s.raw]),
                    _per_request_us(mine),
                )
            )
    return rows


def _find(rows: list[Row], server: str, model: str, client: str, concurrency: int) -> Row | None:
    for row in rows:
        if (row.server, row.model, row.client, row.concurrency) == (
            server,
            model,
            client,
            concurrency,
        ):
            return row
    return None


def tables(rows: list[Row]) -> list[str]:
    lines = []
    for model in sorted({r.model for r in rows}):
        for client in sorted({r.client for r in rows if r.model == model}):
            lines += [
                "",
                f"{model}, {client}: infer/s, p50 and p99 latency (ms), server CPU per request "
                "(ms); ratios are medians of per-round ratios",
                f"{'server':<14}{'conc':>5}{'infer/s':>10}{'p50':>8}{'p99':>8}{'cpu/req':>9}"
                f"{'batch':>7}{'× naive':>9}{'p50 ×':>7}{'cpu ×':>7}{'× raw':>7}{'err':>5}",
            ]
            for row in rows:
                if (row.model, row.client) != (model, client):
                    continue
                naive = row.server == NAIVE
                lines.append(
                    f"{row.server:<14}{row.concurrency:>5}{row.throughput:>10,.1f}"
                    f"{row.p50_ms:>8.2f}{row.p99_ms:>8.1f}{row.cpu_ms:>9.3f}{row.mean_batch:>7.1f}"
                    + (
                        f"{'':>9}{'':>7}{'':>7}"
                        if naive
                        else f"{row.x_naive_throughput:>9.2f}{row.x_naive_p50:>7.2f}"
                        f"{row.x_naive_cpu:>7.2f}"
                    )
                    + f"{row.x_raw:>7.2f}{row.errors:>5}"
                )
    return lines


def accounting(rows: list[Row]) -> list[str]:
    """Where a request's time goes, in µs, for the servers that count it."""
    lines = [
        "",
        "Where a request's time goes (mean µs per request; naive: 'merge' is its decoding; "
        "'rest' is decoding and hand-offs in our server; 'outside' is gRPC, the network and "
        "the client: the client's mean latency minus the time in the server)",
        f"{'model':<11}{'client':<14}{'conc':>5} {'server':<14}{'queue':>8}{'merge':>8}"
        f"{'run':>9}{'split':>8}{'rest':>8}{'in srv':>9}{'outside':>9}{'client':>9}{'cpu':>8}",
    ]
    for row in rows:
        if not row.phases_us:
            continue
        p = row.phases_us
        lines.append(
            f"{row.model:<11}{row.client:<14}{row.concurrency:>5} {row.server:<14}"
            f"{p['queue']:>8.0f}{p['merge']:>8.0f}{p['run']:>9.0f}{p['split']:>8.0f}"
            f"{p['rest']:>8.0f}{p['in_server']:>9.0f}{p['outside']:>9.0f}"
            f"{p['client_mean']:>9.0f}{row.cpu_ms * 1000:>8.0f}"
        )
    return lines


def targets(rows: list[Row]) -> list[str]:
    """The issue's targets against this run's medians."""
    out = ["", "targets (this run):"]
    clients = sorted({r.client for r in rows})
    high = max((r.concurrency for r in rows), default=0)

    def check(label: str, value: float, limit: float, at_most: bool) -> None:
        if value != value:
            return
        ok = value <= limit if at_most else value >= limit
        sign = "≤" if at_most else "≥"
        out.append(f"  [{'met' if ok else 'MISSED'}] {label}: {value:.2f} (target {sign} {limit})")

    for client in clients:
        for model in sorted({r.model for r in rows}):
            low = _find(rows, OURS, model, client, 1)
            top = _find(rows, OURS, model, client, high)
            if low:
                check(f"{client} {model} c1 p50 × naive", low.x_naive_p50, 1.1, True)
            if top is None or high == 1:
                continue
            if model == "mnist_cnn":
                check(
                    f"{client} {model} c{high} infer/s × naive", top.x_naive_throughput, 2.0, False
                )
                check(f"{client} {model} c{high} p99/p50", top.p99_ms / top.p50_ms, 1.5, True)
                if low:
                    check(f"{client} {model} c1 CPU/request × naive", low.x_naive_cpu, 1.0, True)
                check(f"{client} {model} c{high} CPU/request × naive", top.x_naive_cpu, 0.5, True)
            elif model in ("resnet18", "minilm"):
                check(
                    f"{client} {model} c{high} infer/s × naive", top.x_naive_throughput, 1.0, False
                )
                check(f"{client} {model} c{high} × raw onnxruntime best", top.x_raw, 0.95, False)
    return out


def write(rows: list[Row], samples: list[Sample], raws: Mapping[str, object], output: Path) -> str:
    text = "\n".join([*tables(rows), *accounting(rows), *targets(rows)])
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.txt").write_text(text + "\n")
    (output / "results.json").write_text(
        json.dumps(
            {
                "rows": [asdict(r) for r in rows],
                "samples": [asdict(s) for s in samples],
                "raw": raws,
                "machine": {"cpus": os.cpu_count()},
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
            default=str,
        )
    )
    return text
