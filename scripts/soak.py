"""Soak and overload runs against a real server process (not part of the test suite).

    python scripts/soak.py --minutes 10            # soak: ~80% of capacity for 10 minutes
    python scripts/soak.py --minutes 0 --overload 3 \
        --server-args "--grpc-max-pending-calls 128"  # 3x capacity for 30 s

1. Capacity: a closed loop of --concurrency clients for --capacity-seconds;
   throughput = completed requests / time.
2. Soak: an open loop at --load (0.8) of that capacity for --minutes. Requests
   are sent on a fixed schedule whatever the answers, as real traffic is.
   Each minute reports requests, errors, p50 and p99; the server's RSS is
   sampled every 5 s. Verdict: zero errors, RSS growth after the first
   (warm-up) minute below 5%.
3. Overload (--overload F > 0): the same open loop at F x capacity for
   --overload-seconds (the model's queue holds --queue-size requests): how many
   are admitted and their p50/p99, how many are turned away and how fast, by
   status (UNAVAILABLE from the server's queue and limits; CANCELLED from
   gRPC's own bound on calls the server has not taken yet,
   --grpc-max-pending-calls), and the RSS. digits_cnn is so cheap that the
   event loop, not the model, is the bottleneck: the second kind is the one
   this run shows.

The model is digits_cnn from the embedded repository (a small CNN, with its
config's dynamic batching). Results go to bench-results/soak.json.

The server and this client run on separate CPUs (--server-cpus, --client-cpus;
by default the first half and the second half of the CPUs this process may
use), so that neither steals the other's time and the figures describe the
server. The client also records how late it sent each request against its
schedule: when that lag is large the client, not the server, was the limit and
the run says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from benchmark import split_cpus  # scripts/: CPU lists shared with the benchmarks
from tritonclient.grpc import service_pb2, service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
MODEL = "digits_cnn"
OUTSTANDING_LIMIT = 20_000  # the client's own bound; beyond it the client, not the server, lags


CLIENT_LAG_WARNING_MS = 100.0


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else 0.0


@dataclass
class Window:
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    error_ms: dict[str, list[float]] = field(default_factory=dict)
    rejected_ms: list[float] = field(default_factory=list)
    send_lag_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "ok": len(self.latencies_ms),
            "errors": dict(self.errors),
            "error_p50_ms": {code: _percentile(times, 50) for code, times in self.error_ms.items()},
            "p50_ms": round(float(np.percentile(ok, 50)), 3),
            "p99_ms": round(float(np.percentile(ok, 99)), 3),
            "max_ms": round(float(ok.max()), 3),
            "rejected": len(self.rejected_ms),
            "rejected_p50_ms": _percentile(self.rejected_ms, 50),
            "rejected_p99_ms": _percentile(self.rejected_ms, 99),
            "client_send_lag_p99_ms": _percentile(self.send_lag_ms, 99),
            "client_send_lag_max_ms": round(max(self.send_lag_ms, default=0.0), 3),
        }


def _request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 1, 8, 8])
    pixels = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    request.raw_input_contents.append(pixels.tobytes())
    return request


class Server:
    def __init__(
        self, repository: Path, log_path: Path, cpus: set[int], extra_args: list[str]
    ) -> None:
        self.log = log_path.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                "--model-repository",
                str(repository),
                "--grpc-host",
                "127.0.0.1",
                "--grpc-port",
                "18601",
                "--http-port",
                "0",
                "--metrics-port",
                "-1",
                *extra_args,
            ],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            # Before the interpreter starts: every thread it makes inherits the set.
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        self.address = "127.0.0.1:18601"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


async def _wait_ready(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if (await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2)).ready:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the server did not become ready")


async def capacity(stub: Any, concurrency: int, seconds: float) -> float:
    request = _request()
    done = 0
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            await stub.ModelInfer(request, timeout=30)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done / (time.monotonic() - started)


async def open_loop(
    stub: Any, rate: float, seconds: float, window_seconds: float, server: Server
) -> tuple[list[dict[str, Any]], list[tuple[float, float]], int]:
    """Send at `rate` per second for `seconds`; per-window summaries, RSS samples."""
    request = _request()
    windows: list[Window] = []
    rss: list[tuple[float, float]] = []
    outstanding: set[asyncio.Task[None]] = set()
    dropped = 0
    started = time.monotonic()

    async def one(window: Window, due: float) -> None:
        window.send_lag_ms.append(max(0.0, time.monotonic() - due) * 1000)
        sent = time.perf_counter()
        try:
            await stub.ModelInfer(request, timeout=30)
            window.latencies_ms.append((time.perf_counter() - sent) * 1000)
        except grpc.aio.AioRpcError as error:
            elapsed = (time.perf_counter() - sent) * 1000
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                window.rejected_ms.append(elapsed)
            else:
                name = error.code().name
                window.errors[name] = window.errors.get(name, 0) + 1
                window.error_ms.setdefault(name, []).append(elapsed)

    async def sample_rss() -> None:
        while True:
            rss.append((time.monotonic() - started, server.rss_mb()))
            await asyncio.sleep(5)

    sampler = asyncio.create_task(sample_rss())
    index = 0
    total = int(rate * seconds)
    while index < total:
        due = started + index / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        slot = int((time.monotonic() - started) // window_seconds)
        while len(windows) <= slot:
            windows.append(Window())
        if len(outstanding) >= OUTSTANDING_LIMIT:
            dropped += 1
        else:
            task = asyncio.create_task(one(windows[slot], due))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
        index += 1
    if outstanding:
        await asyncio.gather(*outstanding)
    sampler.cancel()
    rss.append((time.monotonic() - started, server.rss_mb()))
    return [window.summary() for window in windows], rss, dropped


def _repository(queue_size: int | None) -> tuple[Path, Path]:
    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    shutil.copytree(ROOT / "models" / "repository" / MODEL, folder / MODEL)
    if queue_size is not None:
        config = folder / MODEL / "config.pbtxt"
        text = config.read_text()
        text = text.replace(
            "dynamic_batching {",
            f"dynamic_batching {{\n  default_queue_policy {{ max_queue_size: {queue_size} }}",
            1,
        )
        config.write_text(text)
    return folder, folder / "server.log"


def _warn_if_client_lagged(windows: list[dict[str, Any]]) -> None:
    worst = max(window["client_send_lag_p99_ms"] for window in windows)
    if worst > CLIENT_LAG_WARNING_MS:
        print(
            f"  WARNING: this client sent up to {worst:.0f} ms behind its schedule (p99): it, "
            "not the server, limited the offered load; give it more CPUs (--client-cpus)"
        )


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"model": MODEL, "arguments": vars(arguments)}
    repository, log_path = _repository(arguments.queue_size)
    server_cpus, client_cpus = split_cpus(arguments.server_cpus, arguments.client_cpus)
    results["server_cpus"], results["client_cpus"] = sorted(server_cpus), sorted(client_cpus)
    print(f"server on CPUs {sorted(server_cpus)}, client on CPUs {sorted(client_cpus)}")
    server = Server(repository, log_path, server_cpus, shlex.split(arguments.server_args))
    os.sched_setaffinity(0, client_cpus)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await _wait_ready(stub)
            measured = await capacity(stub, arguments.concurrency, arguments.capacity_seconds)
            results["capacity_per_s"] = round(measured, 1)
            print(f"capacity: {measured:.0f} requests/s (closed loop, {arguments.concurrency})")
            if arguments.minutes > 0:
                rate = measured * arguments.load
                print(f"soak: {rate:.0f} requests/s for {arguments.minutes} min")
                windows, rss, dropped = await open_loop(
                    stub, rate, arguments.minutes * 60, 60, server
                )
                warm = next((mb for t, mb in rss if t >= 60), rss[0][1])
                final = rss[-1][1]
                errors = sum(sum(w["errors"].values()) + w["rejected"] for w in windows)
                results["soak"] = {
                    "rate_per_s": round(rate, 1),
                    "minutes": windows,
                    "rss_mb": [(round(t), round(mb, 1)) for t, mb in rss],
                    "rss_after_warmup_mb": round(warm, 1),
                    "rss_final_mb": round(final, 1),
                    "rss_growth_pct": round(100 * (final - warm) / warm, 2),
                    "errors": errors,
                    "client_dropped": dropped,
                    "p99_first_minute_ms": windows[0]["p99_ms"],
                    "p99_last_minute_ms": windows[-1]["p99_ms"],
                }
                for minute, window in enumerate(windows, 1):
                    print(
                        f"  minute {minute:2d}: ok {window['ok']:6d}  errors "
                        f"{sum(window['errors'].values()) + window['rejected']:3d}  "
                        f"p50 {window['p50_ms']:7.2f} ms  p99 {window['p99_ms']:7.2f} ms  "
                        f"client lag p99 {window['client_send_lag_p99_ms']:6.1f} ms"
                    )
                _warn_if_client_lagged(windows)
                soak = results["soak"]
                print(
                    f"  errors {soak['errors']}, RSS {soak['rss_after_warmup_mb']} MB after "
                    f"warm-up -> {soak['rss_final_mb']} MB ({soak['rss_growth_pct']:+.2f}%)"
                )
            if arguments.overload > 0:
                rate = measured * arguments.overload
                print(f"overload: {rate:.0f} requests/s for {arguments.overload_seconds} s")
                windows, rss, dropped = await open_loop(
                    stub, rate, arguments.overload_seconds, arguments.overload_seconds, server
                )
                window = windows[0]
                results["overload"] = {
                    "rate_per_s": round(rate, 1),
                    "summary": window,
                    "rss_mb": [(round(t), round(mb, 1)) for t, mb in rss],
                    "client_dropped": dropped,
                }
                print(
                    f"  admitted {window['ok']} (p50 {window['p50_ms']} ms, p99 "
                    f"{window['p99_ms']} ms), rejected {window['rejected']} (p50 "
                    f"{window['rejected_p50_ms']} ms, p99 {window['rejected_p99_ms']} ms), "
                    f"other errors {window['errors']} (p50 {window['error_p50_ms']} ms), "
                    f"RSS {rss[0][1]:.0f} -> {rss[-1][1]:.0f} MB, "
                    f"client lag p99 {window['client_send_lag_p99_ms']} ms"
                )
                _warn_if_client_lagged(windows)
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.8, help="share of capacity to offer")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--overload", type=float, default=0.0, help="x capacity; 0 = skip")
    parser.add_argument("--overload-seconds", type=float, default=30.0)
    parser.add_argument(
        "--queue-size", type=int, default=None, help="max_queue_size for the run's model"
    )
    parser.add_argument("--server-cpus", help="CPU list for the server, e.g. 0 or 0-3")
    parser.add_argument("--client-cpus", help="CPU list for this client, e.g. 1 or 4-7")
    parser.add_argument(
        "--server-args", default="", help="extra flags for the server, e.g. '--log-level debug'"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results" / "soak.json")
    arguments = parser.parse_args()
    results = asyncio.run(run(arguments))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {arguments.output}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
