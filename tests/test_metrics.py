"""/metrics: counts equal the requests sent, and agree with ModelStatistics."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service.metrics import FAMILIES, GPU_FAMILIES, TRITON_FAMILIES
from tests import onnx_models as models
from tests.conftest import ServerThread, serve

CONFIG = """
max_batch_size: 8
dynamic_batching { default_queue_policy { max_queue_size: 1 } }
parameters { key: "latency_objective_ms" value: { string_value: "250" } }
parameters { key: "warmup" value: { string_value: "true" } }
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("metrics")
    models.save(models.sleepy_double(), root, "m", config=CONFIG)
    (root / "broken" / "1").mkdir(parents=True)
    with serve(root) as running:
        yield running


def scrape(server: ServerThread) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url) as page:
        text = page.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def inputs(rows: int = 1, steps: int = 0) -> list[grpcclient.InferInput]:
    x = grpcclient.InferInput("x", [rows, 4], "FP32")
    x.set_data_from_numpy(np.ones((rows, 4), np.float32))
    s = grpcclient.InferInput("steps", [rows, 1], "INT64")
    s.set_data_from_numpy(np.full((rows, 1), steps, np.int64))
    return [x, s]


def test_counts_match_requests_sent_and_model_statistics(server: ServerThread) -> None:
    key = {"model": "m", "version": "1"}
    before = scrape(server)
    with server.client() as client:
        for rows in (1, 2, 3):
            client.infer("m", inputs(rows))
        for _ in range(2):  # INVALID_ARGUMENT: wrong dims
            bad = grpcclient.InferInput("x", [1, 5], "FP32")
            bad.set_data_from_numpy(np.ones((1, 5), np.float32))
            with pytest.raises(InferenceServerException):
                client.infer("m", [bad, inputs()[1]])
        # UNAVAILABLE: the queue holds one request while a long one runs
        version = server.server.registry.resolve("m", "")
        with ThreadPoolExecutor(4) as pool:
            busy = pool.submit(client.infer, "m", inputs(1, 300_000))
            deadline = time.monotonic() + 30
            while version.scheduler.running == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            queued = pool.submit(client.infer, "m", inputs())
            while version.scheduler.queued_requests == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            with pytest.raises(InferenceServerException) as full:
                client.infer("m", inputs())
            assert full.value.status() == "StatusCode.UNAVAILABLE"
            busy.result(60)
            queued.result(60)
        statistics = client.get_inference_statistics("m").model_stats[0]
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("batchwise_requests_total", code="OK", **key) == 5
    assert delta("batchwise_requests_total", code="INVALID_ARGUMENT", **key) == 2
    assert delta("batchwise_requests_total", code="UNAVAILABLE", **key) == 1
    assert delta("batchwise_inferences_total", **key) == 1 + 2 + 3 + 1 + 1
    assert delta("batchwise_request_duration_seconds_count", **key) == 5
    assert delta("batchwise_queue_duration_seconds_count", **key) == 5
    assert delta("batchwise_compute_infer_duration_seconds_count", **key) == 5
    assert delta("batchwise_batch_size_count", **key) == delta("batchwise_executions_total", **key)
    # the same accounting as ModelStatistics
    assert (
        value(after, "batchwise_requests_total", code="OK", **key)
        == statistics.inference_stats.success.count
    )
    assert value(after, "batchwise_executions_total", **key) == statistics.execution_count
    assert value(after, "batchwise_inferences_total", **key) == statistics.inference_count
    failed = sum(
        v
        for labels, v in after["batchwise_requests_total"].items()
        if dict(labels)["model"] == "m" and dict(labels)["code"] != "OK"
    )
    assert failed == statistics.inference_stats.fail.count
    # and Triton's names say the same
    assert (
        value(after, "nv_inference_request_success", **key)
        == statistics.inference_stats.success.count
    )
    assert value(after, "nv_inference_request_failure", reason="REJECTED", **key) >= 1
    assert value(after, "nv_inference_request_failure", reason="OTHER", **key) >= 2
    assert value(after, "nv_inference_exec_count", **key) == statistics.execution_count
    assert (
        value(after, "nv_inference_queue_duration_us", **key)
        == statistics.inference_stats.queue.ns // 1000
    )
    # histogram buckets are cumulative and end at the count
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for labels, v in after["batchwise_request_duration_seconds_bucket"].items()
        if dict(labels)["model"] == "m"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1][1] == value(after, "batchwise_request_duration_seconds_count", **key)


def test_gauges(server: ServerThread) -> None:
    samples = scrape(server)
    assert value(samples, "batchwise_model_ready", model="m", version="1") == 1
    assert value(samples, "batchwise_model_ready", model="broken", version="1") == 0
    assert value(samples, "batchwise_queue_capacity", model="m", version="1") == 1
    assert value(samples, "batchwise_latency_objective_seconds", model="m", version="1") == 0.25
    assert value(samples, "batchwise_model_load_duration_seconds", model="m", version="1") > 0
    assert "batchwise_queue_depth" in samples and "batchwise_requests_in_flight" in samples


def test_every_declared_family_is_exported(server: ServerThread) -> None:
    """FAMILIES is what dashboards and rules are checked against: it must not lie."""
    exported = set(scrape(server))
    for name, (kind, _) in {**FAMILIES, **TRITON_FAMILIES}.items():
        if name in GPU_FAMILIES:
            continue
        expected = {"counter": f"{name}_total", "histogram": f"{name}_count"}.get(kind, name)
        assert expected in exported, name


def test_no_gpu_means_no_gpu_metrics_and_no_errors(server: ServerThread) -> None:
    assert not server.server.metrics.gpus.available
    assert not any(name in GPU_FAMILIES for name in scrape(server))


def test_scrapes_do_not_wait_for_the_event_loop(server: ServerThread) -> None:
    """The endpoint has its own thread: a scrape is answered while the loop is stuck."""
    blocked = threading_event()
    server.loop.call_soon_threadsafe(blocked.block)
    assert blocked.started.wait(10), "the event loop never ran the blocker"
    try:
        # A 2 s timeout while the loop is blocked for 10 s: answered only off the loop.
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as page:
            assert b"batchwise_requests_total" in page.read()
    finally:
        blocked.release()


class threading_event:  # noqa: N801 - a tiny helper, named for what it does
    def __init__(self) -> None:
        import threading

        self.started = threading.Event()
        self._release = threading.Event()

    def block(self) -> None:
        self.started.set()
        self._release.wait(10)

    def release(self) -> None:
        self._release.set()


def test_triton_names_can_be_turned_off(tmp_path: Path) -> None:
    models.save(models.scale(1.0, ["batch", 4]), tmp_path, "plain")
    with serve(tmp_path, triton_metrics=False) as running:
        exported = scrape(running)
    assert "batchwise_requests_total" in exported
    assert not any(name.startswith("nv_") for name in exported)


def test_metrics_off_keeps_statistics(tmp_path: Path) -> None:
    models.save(models.scale(1.0, ["batch", 4]), tmp_path, "plain")
    with serve(tmp_path, metrics_port=-1) as running, running.client() as client:
        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        client.infer("plain", [x])
        assert running.server.metrics_port == 0
        assert client.get_inference_statistics("plain").model_stats[0].inference_count == 1
        snapshot = running.server.registry.resolve("plain", "").stats.snapshot()
        assert snapshot.request_seconds.count == 0  # no histograms kept


def test_the_metrics_port_serves_metrics_only(server: ServerThread) -> None:
    """A probe pointed at the metrics port by mistake must not pass."""
    base = f"http://127.0.0.1:{server.server.metrics_port}"
    for path in ("/", "/v2/health/ready", "/metrics/extra", "/favicon.ico"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(base + path, timeout=5)
        assert missing.value.code == 404, path
        assert b"serves /metrics only" in missing.value.read()
    with urllib.request.urlopen(base + "/metrics", timeout=5) as page:
        assert page.status == 200
        assert b"nv_inference_count" in page.read()
    request = urllib.request.Request(base + "/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=5) as page:
        assert page.headers["Content-Encoding"] == "gzip"
