"""The servers the benchmarks start, and what they count.

* `Server`: this project (`python -m service serve`), ports read from its log.
* `NaiveServer`: `naive_server.py`, the one-run-per-call server a user could
  write instead; the baseline every figure is compared with.
* `grpc_ceiling.py` runs through `Server(entry=...)`: the project answering from
  a cache, the bound that gRPC Python's per-call cost sets.

Both servers answer ModelStatistics, so `phases` reads where their time went
the same way, and `cpu_seconds` reads each process's own CPU counters.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


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


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and its live child processes (a server with
    front-end processes), all their threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    total = (int(fields[11]) + int(fields[12])) / _TICKS
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(OSError):  # exited meanwhile
            total += cpu_seconds(int(child))
    return total


def cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds of a server's processes by role: "server" for a one-process server, or
    "supervisor", "engine" and "front ends" (summed) for --frontend-processes."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    roles = {"server": (int(fields[11]) + int(fields[12])) / _TICKS}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            role = "front ends" if b"frontend" in command else "engine"
            roles[role] = roles.get(role, 0.0) + cpu_seconds(int(child))
    if len(roles) > 1:
        roles["supervisor"] = roles.pop("server")
    return roles


class _Process:
    """A server process whose output is read until a line says it is ready."""

    process: subprocess.Popen[str]

    def _start(
        self,
        command: list[str],
        ready: str,
        cwd: Path,
        cpus: set[int] | None,
        env: dict[str, str] | None = None,
    ) -> list[str]:
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )
        assert self.process.stdout is not None
        lines = []
        for line in self.process.stdout:
            lines.append(line)
            if "failed to load" in line:
                print(line.rstrip(), file=sys.stderr)
            if ready in line:
                break
        threading.Thread(target=self._drain, daemon=True).start()
        return lines

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for _ in self.process.stdout:
            pass

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


class Server(_Process):
    """`python -m service serve` on a repository, ports read from its log."""

    def __init__(
        self,
        repository: Path,
        metrics: bool = True,
        extra: list[str] | None = None,
        entry: list[str] | None = None,
        tree: Path = ROOT,
        cpus: set[int] | None = None,
    ) -> None:
        """`entry`: another entry point (grpc_ceiling.py); `tree`: the checkout whose
        `service` runs; `cpus`: pin the server to these."""
        lines = self._start(
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
            "server ready",
            tree,
            cpus,
            # Environment rather than flags: a baseline checkout without HTTP ignores them.
            {"BATCHWISE_HTTP_HOST": "127.0.0.1", "BATCHWISE_HTTP_PORT": "-1"},
        )
        self.url = ""
        self.http_url = ""
        self.metrics = ""
        for line in lines:
            grpc_port = re.search(r"gRPC server listening on [\d.]+:(\d+)", line)
            http_port = re.search(r"HTTP server listening on https?://[\d.]+:(\d+)", line)
            metrics_port = re.search(r"metrics endpoint listening on (http://\S+)", line)
            if http_port:
                self.http_url = f"127.0.0.1:{http_port.group(1)}"
            if grpc_port:
                self.url = f"127.0.0.1:{grpc_port.group(1)}"
            if metrics_port:
                self.metrics = metrics_port.group(1)
        if not self.url or (metrics and not self.metrics):
            raise RuntimeError("the server did not start:\n" + "".join(lines[-20:]))

    def model_counters(self, model: str) -> dict[str, float]:
        """Counters from /metrics (rows, executions, padding), when metrics are on."""
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


class NaiveServer(_Process):
    """scripts/naive_server.py on a repository (only plain model folders in it)."""

    def __init__(self, repository: Path, cpus: set[int] | None = None) -> None:
        lines = self._start(
            [
                sys.executable,
                str(ROOT / "scripts" / "naive_server.py"),
                "--model-repository",
                str(repository),
            ],
            "naive server listening",
            ROOT,
            cpus,
        )
        match = re.search(r"listening on ([\d.]+:\d+)", lines[-1] if lines else "")
        if match is None:
            raise RuntimeError("the naive server did not start:\n" + "".join(lines[-20:]))
        self.url = match.group(1)


@dataclass(frozen=True)
class Phases:
    """Cumulative request count and nanoseconds per phase, from ModelStatistics."""

    requests: int = 0
    rows: int = 0
    executions: int = 0
    total_ns: int = 0  # in the server: arrival to answer built (success)
    queue_ns: int = 0
    merge_ns: int = 0  # compute_input: merging requests into a batch (decoding, for naive)
    run_ns: int = 0  # compute_infer: onnxruntime
    split_ns: int = 0  # compute_output: splitting and encoding outputs

    def __sub__(self, other: Phases) -> Phases:
        return Phases(*(a - b for a, b in zip(_values(self), _values(other), strict=True)))


def _values(phases: Phases) -> tuple[int, ...]:
    return (
        phases.requests,
        phases.rows,
        phases.executions,
        phases.total_ns,
        phases.queue_ns,
        phases.merge_ns,
        phases.run_ns,
        phases.split_ns,
    )


def phases(url: str, model: str) -> Phases:
    """A server's ModelStatistics for `model` version 1, as Phases (zeros if it has none)."""
    import tritonclient.grpc as grpcclient

    try:
        with grpcclient.InferenceServerClient(url) as client:
            stats = client.get_inference_statistics(model, "1", as_json=True)["model_stats"][0]
    except Exception:
        return Phases()
    infer = stats.get("inference_stats", {})

    def ns(name: str) -> int:
        return int(infer.get(name, {}).get("ns", 0))

    return Phases(
        requests=int(infer.get("success", {}).get("count", 0)),
        rows=int(stats.get("inference_count", 0)),
        executions=int(stats.get("execution_count", 0)),
        total_ns=ns("success"),
        queue_ns=ns("queue"),
        merge_ns=ns("compute_input"),
        run_ns=ns("compute_infer"),
        split_ns=ns("compute_output"),
    )


def server_side(url: str, model: str) -> dict[str, int]:
    """Cumulative batches, their rows and nanoseconds per phase, from ModelStatistics.

    Read from `batch_stats` (one count per execution): `inference_stats` adds each
    batch's durations once for every request in it, as Triton's does.
    """
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    names = ("compute_input", "compute_infer", "compute_output")
    totals = dict.fromkeys(("batches", "rows", *names), 0)
    for entry in stats.get("batch_stats", []):
        count = int(entry.get("compute_infer", {}).get("count", 0))
        totals["batches"] += count
        totals["rows"] += count * int(entry["batch_size"])
        for name in names:
            totals[name] += int(entry.get(name, {}).get("ns", 0))
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
