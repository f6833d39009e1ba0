"""Prometheus metrics, read at scrape time from the same accounting as ModelStatistics.

A custom collector derives every sample from `ModelStats` snapshots when
Prometheus scrapes, so metrics and the ModelStatistics RPC cannot disagree and
the inference path pays nothing extra. The HTTP endpoint runs in its own
thread, off the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from threading import Thread
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import StartupError
from .repository import ModelRegistry, VersionState

log = logging.getLogger(__name__)

NAMESPACE = "batchwise"


class ModelCollector(Collector):
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            f"{NAMESPACE}_requests",
            "Inference requests that reached a model, by final status",
            labels=[*labels, "status"],
        )
        rows = CounterMetricFamily(
            f"{NAMESPACE}_inferences", "Rows inferred (sum of request batch sizes)", labels=labels
        )
        executions = CounterMetricFamily(
            f"{NAMESPACE}_executions", "Model executions (session runs)", labels=labels
        )
        ready = GaugeMetricFamily(
            f"{NAMESPACE}_model_ready", "1 if the model version is ready to serve", labels=labels
        )
        elements = CounterMetricFamily(
            f"{NAMESPACE}_input_elements",
            "Input elements fed to the model, padding included",
            labels=labels,
        )
        padded = CounterMetricFamily(
            f"{NAMESPACE}_padded_elements",
            "Input elements that were padding added to batch variable-length requests",
            labels=labels,
        )
        in_flight = GaugeMetricFamily(
            f"{NAMESPACE}_requests_in_flight",
            "Requests admitted to the model version and not yet answered",
            labels=labels,
        )
        for name in sorted(self._registry.records):
            record = self._registry.records[name]
            for number, version_record in sorted(record.versions.items()):
                key = [name, str(number)]
                ready.add_metric(key, 1.0 if version_record.state is VersionState.READY else 0.0)
                if version_record.loaded is None:
                    continue
                snapshot = version_record.loaded.stats.snapshot()
                requests.add_metric([*key, "OK"], snapshot.success.count)
                for status, count in sorted(snapshot.failures_by_status.items()):
                    requests.add_metric([*key, status], count)
                rows.add_metric(key, snapshot.inference_count)
                in_flight.add_metric(key, snapshot.in_flight)
                elements.add_metric(key, snapshot.input_elements)
                padded.add_metric(key, snapshot.padded_elements)
                executions.add_metric(key, snapshot.execution_count)
        yield from (requests, rows, executions, ready, in_flight, elements, padded)


class MetricsEndpoint:
    """The /metrics HTTP server; port 0 binds a free port, reported by `port`."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(ModelCollector(registry))
        self._server: Any = None
        self._thread: Thread | None = None
        self.port = 0

    def start(self, host: str, port: int) -> int:
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise StartupError(f"cannot listen for metrics on {host}:{port}: {error}") from None
        self.port = int(self._server.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
