"""Prometheus metrics, computed at scrape time from the accounting behind ModelStatistics.

A custom collector turns `ModelStats` snapshots into metric families when
Prometheus scrapes, so /metrics and the ModelStatistics RPC cannot disagree and
the inference path pays only for the accounting it already does (plus a few
histogram bisects, skipped when metrics are off). The HTTP endpoint runs in its
own thread, off the event loop.

Naming follows Prometheus: `batchwise_` prefix, base units (seconds, bytes,
ratios 0..1), `_total` counters, labels `model` and `version` (and `code`, a
gRPC status name, on request counts). `TRITON_FAMILIES` repeats the counters
and GPU gauges under Triton's own names (`--triton-metrics`) so that Triton
dashboards and `perf_analyzer --collect-metrics` keep working; Triton's
counters carry no `_total` suffix, which Prometheus' Python client reserves
for typed counters, so they are exposed untyped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from threading import Thread
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .errors import StartupError
from .gpu import GpuMonitor, GpuReading
from .metrics_http import serve_metrics
from .repository import ModelRegistry, ModelVersion, VersionState
from .statistics import Histogram, StatsSnapshot

log = logging.getLogger(__name__)

NAMESPACE = "batchwise"
LABELS = ["model", "version"]

# Every family this server exports: name -> (type, help). GPU families appear only with a GPU.
FAMILIES: dict[str, tuple[str, str]] = {
    "batchwise_requests": ("counter", "Requests that reached a model, by final gRPC status code"),
    "batchwise_inferences": ("counter", "Rows inferred (the sum of request batch sizes)"),
    "batchwise_executions": ("counter", "Model executions: batches run by onnxruntime"),
    "batchwise_input_elements": ("counter", "Input elements fed to the model, padding included"),
    "batchwise_padded_elements": (
        "counter",
        "Input elements that were padding added to batch variable-length requests",
    ),
    "batchwise_request_duration_seconds": (
        "histogram",
        "Server-side latency of successful requests, from arrival to response",
    ),
    "batchwise_queue_duration_seconds": (
        "histogram",
        "Time successful requests waited in the scheduler's queue",
    ),
    "batchwise_compute_input_duration_seconds": (
        "histogram",
        "Time spent preparing a request's batch inputs (merge, pad, reshape)",
    ),
    "batchwise_compute_infer_duration_seconds": (
        "histogram",
        "Time onnxruntime spent running the batch that served a request",
    ),
    "batchwise_compute_output_duration_seconds": (
        "histogram",
        "Time spent splitting and encoding a request's batch outputs",
    ),
    "batchwise_batch_size": ("histogram", "Rows per model execution (formed batch size)"),
    "batchwise_padding_ratio": (
        "histogram",
        "Share of a batch's input elements that were padding, per execution",
    ),
    "batchwise_queue_depth": ("gauge", "Requests waiting in the scheduler's queue"),
    "batchwise_queue_capacity": (
        "gauge",
        "max_queue_size of the default priority level (absent when unbounded)",
    ),
    "batchwise_requests_in_flight": (
        "gauge",
        "Requests admitted to the model version and not yet answered",
    ),
    "batchwise_model_ready": (
        "gauge",
        "1 if the model version serves, 0 if it failed to load (version '' for a model "
        "whose configuration failed)",
    ),
    "batchwise_model_load_duration_seconds": ("gauge", "How long the version took to load"),
    "batchwise_model_warmup_duration_seconds": (
        "gauge",
        "How long the version's warm-up at load took (absent when it was not warmed up)",
    ),
    "batchwise_model_execution_info": (
        "gauge",
        "1 per device a model version runs on, labelled with onnxruntime's execution provider",
    ),
    "batchwise_latency_objective_seconds": (
        "gauge",
        "The p99 latency objective from the model's latency_objective_ms parameter",
    ),
    "batchwise_gpu_utilization_ratio": ("gauge", "GPU busy fraction over the driver's sample"),
    "batchwise_gpu_memory_used_bytes": ("gauge", "GPU memory in use"),
    "batchwise_gpu_memory_total_bytes": ("gauge", "GPU memory in total"),
    "batchwise_gpu_power_watts": ("gauge", "GPU power draw"),
}
TRITON_FAMILIES: dict[str, tuple[str, str]] = {
    "nv_inference_request_success": ("untyped", "Number of successful inference requests"),
    "nv_inference_request_failure": ("untyped", "Number of failed inference requests, by reason"),
    "nv_inference_count": ("untyped", "Number of inferences performed (rows)"),
    "nv_inference_exec_count": ("untyped", "Number of model executions performed"),
    "nv_inference_request_duration_us": ("untyped", "Cumulative inference request duration"),
    "nv_inference_queue_duration_us": ("untyped", "Cumulative inference queuing duration"),
    "nv_inference_compute_input_duration_us": ("untyped", "Cumulative compute input duration"),
    "nv_inference_compute_infer_duration_us": ("untyped", "Cumulative compute inference duration"),
    "nv_inference_compute_output_duration_us": ("untyped", "Cumulative compute output duration"),
    "nv_inference_pending_request_count": ("gauge", "Instantaneous number of pending requests"),
    "nv_model_load_duration_secs": ("gauge", "Model load time in seconds"),
    "nv_gpu_utilization": ("gauge", "GPU utilization rate [0.0 - 1.0)"),
    "nv_gpu_memory_total_bytes": ("gauge", "GPU total memory, in bytes"),
    "nv_gpu_memory_used_bytes": ("gauge", "GPU used memory, in bytes"),
    "nv_gpu_power_usage": ("gauge", "GPU power usage in watts"),
}
GPU_FAMILIES = {name for name in (*FAMILIES, *TRITON_FAMILIES) if "_gpu_" in name}

# Triton's failure reasons, from our status codes.
_TRITON_REASONS = {
    "UNAVAILABLE": "REJECTED",
    "RESOURCE_EXHAUSTED": "REJECTED",
    "CANCELLED": "CANCELED",
    "DEADLINE_EXCEEDED": "CANCELED",
    "INTERNAL": "BACKEND",
}


def _family(name: str, labels: list[str], table: dict[str, tuple[str, str]]) -> Metric:
    kind, documentation = table[name]
    if kind == "counter":
        return CounterMetricFamily(name, documentation, labels=labels)
    if kind == "gauge":
        return GaugeMetricFamily(name, documentation, labels=labels)
    if kind == "histogram":
        return HistogramMetricFamily(name, documentation, labels=labels)
    return Metric(name, documentation, "unknown")


def _add_histogram(family: Metric, key: list[str], histogram: Histogram) -> None:
    buckets = [
        ("+Inf" if bound == float("inf") else repr(float(bound)), count)
        for bound, count in histogram.cumulative()
    ]
    family.add_metric(key, buckets, histogram.total)  # type: ignore[attr-defined]


class ModelCollector(Collector):
    def __init__(self, registry: ModelRegistry, gpus: GpuMonitor, triton_names: bool) -> None:
        self._registry = registry
        self._gpus = gpus
        self._triton = triton_names

    def collect(self) -> Iterator[Metric]:
        families = {name: _family(name, self._labels(name), FAMILIES) for name in FAMILIES}
        triton = {
            name: _family(name, self._labels(name), TRITON_FAMILIES) for name in TRITON_FAMILIES
        }
        for name in sorted(self._registry.records):
            record = self._registry.records[name]
            if record.reason:
                families["batchwise_model_ready"].add_metric([name, ""], 0.0)  # type: ignore[attr-defined]
            for number, version_record in sorted(record.versions.items()):
                key = [name, str(number)]
                ready = 1.0 if version_record.state is VersionState.READY else 0.0
                families["batchwise_model_ready"].add_metric(key, ready)  # type: ignore[attr-defined]
                if version_record.loaded is not None:
                    loaded = version_record.loaded
                    snapshot = loaded.stats.snapshot()
                    self._native(families, key, loaded, snapshot)
                    if self._triton:
                        self._triton_samples(triton, key, loaded, snapshot)
        readings = self._gpus.read()
        self._gpu_samples(families, triton, readings)
        wanted = [
            family
            for name, family in families.items()
            if family.samples or name not in GPU_FAMILIES
        ]
        if self._triton:
            wanted += [
                family
                for name, family in triton.items()
                if family.samples or name not in GPU_FAMILIES
            ]
        yield from wanted

    @staticmethod
    def _labels(name: str) -> list[str]:
        if name == "batchwise_requests":
            return [*LABELS, "code"]
        if name == "nv_inference_request_failure":
            return [*LABELS, "reason"]
        if name == "batchwise_model_execution_info":
            return [*LABELS, "provider", "device"]
        if "_gpu_" in name:
            return ["gpu_uuid"] if name.startswith("nv_") else ["gpu", "uuid"]
        return LABELS

    @staticmethod
    def _native(
        families: dict[str, Metric], key: list[str], version: ModelVersion, snapshot: StatsSnapshot
    ) -> None:
        def add(name: str, value: float, labels: Iterable[str] = ()) -> None:
            families[name].add_metric([*key, *labels], value)  # type: ignore[attr-defined]

        add("batchwise_requests", snapshot.success.count, ["OK"])
        for code, count in sorted(snapshot.failures_by_status.items()):
            add("batchwise_requests", count, [code])
        add("batchwise_inferences", snapshot.inference_count)
        add("batchwise_executions", snapshot.execution_count)
        add("batchwise_input_elements", snapshot.input_elements)
        add("batchwise_padded_elements", snapshot.padded_elements)
        for name, histogram in (
            ("batchwise_request_duration_seconds", snapshot.request_seconds),
            ("batchwise_queue_duration_seconds", snapshot.queue_seconds),
            ("batchwise_compute_input_duration_seconds", snapshot.compute_input_seconds),
            ("batchwise_compute_infer_duration_seconds", snapshot.compute_infer_seconds),
            ("batchwise_compute_output_duration_seconds", snapshot.compute_output_seconds),
            ("batchwise_batch_size", snapshot.batch_size),
            ("batchwise_padding_ratio", snapshot.padding_ratio),
        ):
            _add_histogram(families[name], key, histogram)
        scheduler = version.scheduler
        add("batchwise_queue_depth", scheduler.queued_requests)
        capacity = scheduler.policy.queues[scheduler.policy.default_level].max_queue_size
        if capacity:
            add("batchwise_queue_capacity", capacity)
        add("batchwise_requests_in_flight", snapshot.in_flight)
        add("batchwise_model_load_duration_seconds", version.load_seconds)
        if version.warmup is not None:
            add("batchwise_model_warmup_duration_seconds", version.warmup.seconds)
        for device in version.devices:
            add("batchwise_model_execution_info", 1.0, [version.provider, device])
        if version.latency_objective_seconds is not None:
            add("batchwise_latency_objective_seconds", version.latency_objective_seconds)

    @staticmethod
    def _triton_samples(
        families: dict[str, Metric], key: list[str], version: ModelVersion, snapshot: StatsSnapshot
    ) -> None:
        labels = dict(zip(LABELS, key, strict=True))

        def sample(name: str, value: float, **extra: str) -> None:
            family = families[name]
            if family.type == "gauge":
                family.add_metric([*key, *extra.values()], value)  # type: ignore[attr-defined]
            else:
                family.add_sample(name, {**labels, **extra}, value)

        sample("nv_inference_request_success", snapshot.success.count)
        reasons: dict[str, int] = {}
        for code, count in snapshot.failures_by_status.items():
            reason = _TRITON_REASONS.get(code, "OTHER")
            reasons[reason] = reasons.get(reason, 0) + count
        for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
            sample("nv_inference_request_failure", reasons.get(reason, 0), reason=reason)
        sample("nv_inference_count", snapshot.inference_count)
        sample("nv_inference_exec_count", snapshot.execution_count)
        sample("nv_inference_request_duration_us", snapshot.success.ns // 1000)
        sample("nv_inference_queue_duration_us", snapshot.queue.ns // 1000)
        sample("nv_inference_compute_input_duration_us", snapshot.compute_input.ns // 1000)
        sample("nv_inference_compute_infer_duration_us", snapshot.compute_infer.ns // 1000)
        sample("nv_inference_compute_output_duration_us", snapshot.compute_output.ns // 1000)
        sample("nv_inference_pending_request_count", version.scheduler.queued_requests)
        sample("nv_model_load_duration_secs", version.load_seconds)

    @staticmethod
    def _gpu_samples(
        families: dict[str, Metric], triton: dict[str, Metric], readings: list[GpuReading]
    ) -> None:
        for gpu in readings:
            ours = [str(gpu.index), gpu.uuid]
            for name, value in (
                ("batchwise_gpu_utilization_ratio", gpu.utilization),
                ("batchwise_gpu_memory_used_bytes", gpu.memory_used_bytes),
                ("batchwise_gpu_memory_total_bytes", gpu.memory_total_bytes),
                ("batchwise_gpu_power_watts", gpu.power_watts),
            ):
                if value is not None:
                    families[name].add_metric(ours, value)  # type: ignore[attr-defined]
            for name, value in (
                ("nv_gpu_utilization", gpu.utilization),
                ("nv_gpu_memory_used_bytes", gpu.memory_used_bytes),
                ("nv_gpu_memory_total_bytes", gpu.memory_total_bytes),
                ("nv_gpu_power_usage", gpu.power_watts),
            ):
                if value is not None:
                    triton[name].add_metric([gpu.uuid], value)  # type: ignore[attr-defined]


class MetricsEndpoint:
    """The /metrics HTTP server; port 0 binds a free port, reported by `port`."""

    def __init__(self, registry: ModelRegistry, triton_names: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.gpus = GpuMonitor()
        self.registry.register(ModelCollector(registry, self.gpus, triton_names))
        self._server: Any = None
        self._thread: Thread | None = None
        self.port = 0

    def start(self, host: str, port: int) -> int:
        try:
            self._server, self._thread = serve_metrics(self.registry, host, port)
        except OSError as error:
            raise StartupError(f"cannot listen for metrics on {host}:{port}: {error}") from None
        self.port = int(self._server.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
