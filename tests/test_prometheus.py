"""Our Prometheus configuration, rules and dashboard, checked by promtool and a real Prometheus.

Debian's `prometheus` package (installed by `make test` / `.ci/run`) provides
both binaries. The real Prometheus runs on loopback with a temporary data dir,
scrapes a real server every second through deploy/prometheus's own config (its
targets swapped for the test server's), and is queried over its HTTP API.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from service.metrics import FAMILIES, TRITON_FAMILIES
from tests import onnx_models as models
from tests.conftest import ServerThread, serve

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"


def binary(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: install Debian's prometheus package (make test does)"
    return found


def promtool(*arguments: str) -> str:
    result = subprocess.run(
        [binary("promtool"), *arguments],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_check_config() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")


def test_promtool_check_rules() -> None:
    output = promtool("check", "rules", "rules/recording.yml", "rules/alerts.yml")
    assert "SUCCESS: 8 rules found" in output and "SUCCESS: 5 rules found" in output


def test_promtool_alert_unit_tests() -> None:
    """Each alert fires on bad series and stays quiet on good ones (tests/alerts-test.yml)."""
    assert "SUCCESS" in promtool("test", "rules", "tests/alerts-test.yml")


# ------------------------------------------------------- names in PromQL ---

_FUNCTIONS_AND_KEYWORDS = {
    "sum",
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "max",
    "min",
    "avg",
    "count",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "label_values",
    "topk",
    "bottomk",
    "abs",
    "clamp_min",
    "clamp_max",
}


def metric_names(expression: str) -> set[str]:
    """The series names a PromQL expression reads (label matchers, groupings, strings removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expression)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end() :].lstrip()[:1]
        if word in _FUNCTIONS_AND_KEYWORDS or following == "(" or word.startswith("$"):
            continue
        names.add(word)
    return names


def exported_series() -> set[str]:
    names = {"up"}
    for name, (kind, _) in {**FAMILIES, **TRITON_FAMILIES}.items():
        if kind == "counter":
            names.add(f"{name}_total")
        elif kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def rule_expressions() -> dict[str, str]:
    expressions = {}
    for path in sorted((PROMETHEUS / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                expressions[rule.get("record") or rule["alert"]] = rule["expr"]
    return expressions


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "batchwise.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"]
        expressions.append(re.sub(r"^label_values\(([^,]+),.*\)$", r"\1", query))
    return expressions


def test_rules_and_dashboard_read_only_what_the_server_exports() -> None:
    known = exported_series() | {name for name in rule_expressions() if ":" in name}
    unknown: dict[str, set[str]] = {}
    for where, expression in [
        *rule_expressions().items(),
        *(("dashboard", e) for e in dashboard_expressions()),
    ]:
        missing = metric_names(expression) - known
        if missing:
            unknown.setdefault(where, set()).update(missing)
    assert not unknown, unknown
    assert metric_names('sum by (model) (rate(batchwise_requests_total{code!="OK"}[5m]))') == {
        "batchwise_requests_total"
    }


def test_dashboard_has_the_panels_operators_need() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "batchwise.json").read_text())
    titles = " | ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in (
        "throughput",
        "errors by code",
        "p50",
        "queue vs compute",
        "batch size",
        "queue depth",
        "readiness",
        "gpu",
    ):
        assert topic in titles, topic
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["uid"] == "prometheus"


# -------------------------------------------------------- real Prometheus ---


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("prom_repository")
    models.save(models.scale(2.0, ["batch", 4]), root, "scaled")
    with serve(root) as server:
        yield server


@pytest.fixture(scope="module")
def prometheus(served: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    job = config["scrape_configs"][0]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{served.server.metrics_port}"]}]
    config["rule_files"] = [str(PROMETHEUS / path) for path in config["rule_files"]]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            binary("prometheus"),
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: query(url, "up") is not None, "Prometheus never answered")
        yield url
    finally:
        process.terminate()
        process.wait(30)


def query(url: str, promql: str) -> list[dict[str, Any]] | None:
    address = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(address, timeout=5) as page:
            body = json.loads(page.read())
    except OSError:
        return None
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def wait_for(condition: Any, message: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(message)


def test_real_prometheus_counts_requests_and_takes_quantiles(
    served: ServerThread, prometheus: str
) -> None:
    sent = 17
    with served.client() as client:
        for _ in range(sent):
            x = grpcclient.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            client.infer("scaled", [x])
    counted = 'sum(batchwise_requests_total{model="scaled",code="OK"})'

    def scraped_all() -> bool:
        result = query(prometheus, counted)
        return bool(result) and float(result[0]["value"][1]) == sent

    wait_for(scraped_all, f"Prometheus never counted {sent} requests")
    quantile = query(
        prometheus,
        "histogram_quantile(0.99, sum by (le) "
        '(batchwise_request_duration_seconds_bucket{model="scaled"}))',
    )
    assert quantile and math.isfinite(float(quantile[0]["value"][1]))
    assert float(quantile[0]["value"][1]) > 0
    # our recording rules run in the real engine too
    wait_for(
        lambda: bool(query(prometheus, 'model:batchwise_requests:rate5m{model="scaled"}')),
        "the recording rules never produced a series",
    )
    ready = query(prometheus, 'batchwise_model_ready{model="scaled"}')
    assert ready and float(ready[0]["value"][1]) == 1
