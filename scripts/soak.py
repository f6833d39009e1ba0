"""Soak and overload runs against a real server process (not part of the test suite).

    python scripts/soak.py --minutes 10            # soak: ~80% of capacity for 10 minutes
    python scripts/soak.py --minutes 1 --overload 3 # and then 3x capacity for 30 s

1. Capacity: a closed loop of --concurrency clients for --capacity-seconds;
   throughput = completed requests / time.
2. Soak: an open loop at --load (0.8) of that capacity for --minutes. Requests
   are sent on a fixed schedule whatever the answers, as real traffic is.
   Each minute reports requests, errors, p50 and p99; the server's RSS is
   sampled every 5 s. Verdict: zero errors, RSS growth after the first
   (warm-up) minute below 5%.
3. Overload (--overload F > 0): the same open loop at F x capacity for
   --overload-seconds against a model whose queue holds --queue-size requests:
   how many are rejected (UNAVAILABLE), how fast, the p99 of those admitted,
   and the RSS.

The model is digits_cnn from the embedded repository (a small CNN, with its
config's dynamic batching). Results go to bench-results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from tritonclient.grpc import service_pb2, service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
MODEL = "digits_cnn"
OUTSTANDING_LIMIT = 20_000  # the client's own bound; beyond it the client, not the server, lags


@dataclass
class Window:
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    rejected_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        rejected = np.array(self.rejected_ms) if self.rejected_ms else np.zeros(1)
        return {
            "ok": len(self.latencies_ms),
            "errors": dict(self.errors),
            "p50_ms": round(float(np.percentile(ok, 50)), 3),
            "p99_ms": round(float(np.percentile(ok, 99)), 3),
            "max_ms": round(float(ok.max()), 3),
            "rejected": len(self.rejected_ms),
            "rejected_p50_ms": round(float(np.percentile(rejected, 50)), 3),
            "rejected_p99_ms": round(float(np.percentile(rejected, 99)), 3),
        }


def _request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 1, 8, 8])
    pixels = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    request.raw_input_contents.append(pixels.tobytes())
    return request


class Server:
    def __init__(self, repository: Path, log_path: Path) -> None:
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
                "--metrics-port",
                "-1",
            ],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
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

    async def one(window: Window) -> None:
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
            task = asyncio.create_task(one(windows[slot]))
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


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"model": MODEL, "arguments": vars(arguments)}
    repository, log_path = _repository(arguments.queue_size)
    server = Server(repository, log_path)
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
                        f"p50 {window['p50_ms']:7.2f} ms  p99 {window['p99_ms']:7.2f} ms"
                    )
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
                    f"other errors {window['errors']}, RSS {rss[0][1]:.0f} -> {rss[-1][1]:.0f} MB"
                )
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
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results" / "soak.json")
    arguments = parser.parse_args()
    results = asyncio.run(run(arguments))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {arguments.output}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
