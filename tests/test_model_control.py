"""Model control: explicit load/unload, config override, new versions under load, poll mode."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models as models
from tests.conftest import LAYOUTS, FrontendsServer, ServerThread, http_client, serve
from tests.process import start_on_loopback

WIDTH = 4


def _x(rows: int = 1, value: float = 1.0) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("x", [rows, WIDTH], "FP32")
    tensor.set_data_from_numpy(np.full((rows, WIDTH), value, np.float32))
    return [tensor]


def _save_scale(root: Path, name: str, version: int, factor: float) -> None:
    models.save(models.scale(factor, ["batch", WIDTH]), root, name, version)


def _index(client: grpcclient.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    return {
        (m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models
    }


def _error(call: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()  # type: ignore[operator]
    return caught.value


@pytest.fixture()
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "repository"
    _save_scale(root, "alpha", 1, 1.0)
    _save_scale(root, "beta", 1, 3.0)
    models.save(
        models.sleepy_double(),
        root,
        "sleepy",
        config="max_batch_size: 4\ndynamic_batching { }\n",
    )
    return root


@pytest.fixture()
def explicit_here(repository: Path) -> Iterator[ServerThread]:
    """Explicit mode in this process, for tests that look inside the registry."""
    with serve(repository, model_control_mode="explicit", load_model="alpha,sleepy") as server:
        yield server


@pytest.fixture(params=LAYOUTS)
def explicit(
    repository: Path, request: pytest.FixtureRequest
) -> Iterator[ServerThread | FrontendsServer]:
    """Explicit mode in one process, and behind two front ends."""
    if request.param == LAYOUTS[0]:
        yield request.getfixturevalue("explicit_here")
        return
    frontends = FrontendsServer(
        start_on_loopback(
            repository,
            "--frontend-processes",
            "2",
            "--model-control-mode",
            "explicit",
            "--load-model",
            "alpha,sleepy",
        )
    )
    yield frontends
    assert frontends.stop() == 0, frontends.process.log


def test_explicit_mode_loads_only_what_it_is_told(explicit: ServerThread | FrontendsServer) -> None:
    with explicit.client() as client:
        index = _index(client)
        assert index[("alpha", "1")] == ("READY", "")
        assert index[("beta", "")] == ("UNAVAILABLE", "not loaded")
        assert not client.is_model_ready("beta")
        assert client.is_server_ready()
        assert "model_repository" in client.get_server_metadata().extensions
        client.load_model("beta")
        assert client.is_model_ready("beta")
        np.testing.assert_array_equal(client.infer("beta", _x()).as_numpy("y"), np.full((1, 4), 3))


def test_config_override_is_applied_at_load(explicit: ServerThread | FrontendsServer) -> None:
    override = {"max_batch_size": 2, "dynamic_batching": {}}
    with explicit.client() as client:
        client.load_model("beta", config=json.dumps(override))
        assert client.get_model_config("beta").config.max_batch_size == 2
        error = _error(lambda: client.infer("beta", _x(rows=3)))
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert "accepts 1 to 2 (max_batch_size)" in error.message()
        bad = _error(lambda: client.load_model("beta", config='{"max_batch_size": "many"}'))
        assert bad.status() == "StatusCode.INVALID_ARGUMENT"
        assert "parameter 'config'" in bad.message()
        # The bad override changed nothing.
        assert client.get_model_config("beta").config.max_batch_size == 2


def test_model_control_over_http(explicit: ServerThread | FrontendsServer) -> None:
    """tritonclient.http: load with a config override, index, unload; bad calls are 4xx."""
    with http_client(explicit.http_url) as client:
        index = {(m["name"], m["version"]): m["state"] for m in client.get_model_repository_index()}
        assert index[("alpha", "1")] == "READY" and index[("beta", "")] == "UNAVAILABLE"
        client.load_model("beta", config=json.dumps({"max_batch_size": 2}))
        assert client.is_model_ready("beta")
        assert client.get_model_config("beta")["max_batch_size"] == 2
        x = httpclient.InferInput("x", [1, WIDTH], "FP32")
        x.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
        np.testing.assert_array_equal(client.infer("beta", [x]).as_numpy("y"), [[3, 3, 3, 3]])
        client.unload_model("beta")
        assert not client.is_model_ready("beta")
        bad = _error(lambda: client.load_model("beta", config='{"max_batch_size": "many"}'))
        assert bad.status() == "400" and "parameter 'config'" in bad.message()
        missing = _error(lambda: client.load_model("no_such_model"))
        assert missing.status() in ("400", "404") and "no_such_model" in missing.message()
        status, _ = _post(
            explicit.http_url,
            "/v2/repository/models/beta/load",
            {"parameters": {"file:1/model.onnx": "AAAA"}},
        )
        assert status == 501
        status, answer = _post(
            explicit.http_url, "/v2/repository/models/beta/load", {"parameters": {"colour": "blue"}}
        )
        assert status == 400 and "unknown parameter 'colour'" in answer["error"]
        status, answer = _post(explicit.http_url, "/v2/repository/index", [1])
        assert status == 400 and "must be a JSON object" in answer["error"]


def _post(url: str, path: str, document: object) -> tuple[int, dict[str, str]]:
    host, port = url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", path, body=json.dumps(document))
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def test_a_failed_load_keeps_the_old_version_serving(
    explicit: ServerThread | FrontendsServer, repository: Path
) -> None:
    (repository / "alpha" / "2").mkdir()
    (repository / "alpha" / "2" / "model.onnx").write_bytes(b"\x08\x07truncated")
    with explicit.client() as client:
        error = _error(lambda: client.load_model("alpha"))
        assert error.status() == "StatusCode.FAILED_PRECONDITION"
        assert "failed to load model 'alpha': version 2:" in error.message()
        assert "the versions loaded before keep serving" in error.message()
        assert str(repository) not in error.message()
        result = client.infer("alpha", _x(value=5.0))
        assert result.get_response().model_version == "1"
        np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 5))
        assert _index(client)[("alpha", "1")] == ("READY", "")


def test_a_new_version_loads_under_load_without_failing_a_request(
    explicit: ServerThread | FrontendsServer, repository: Path
) -> None:
    answers: list[tuple[str, float]] = []
    failures: list[str] = []
    stop = threading.Event()

    def send() -> None:
        with explicit.client() as client:
            while not stop.is_set():
                try:
                    result = client.infer("alpha", _x(value=2.0))
                except InferenceServerException as error:
                    failures.append(f"{error.status()}: {error.message()}")
                    continue
                output = result.as_numpy("y")
                assert output is not None
                answers.append((result.get_response().model_version, float(output[0, 0])))

    with ThreadPoolExecutor(4) as pool:
        senders = [pool.submit(send) for _ in range(4)]
        time.sleep(0.5)
        _save_scale(repository, "alpha", 2, 10.0)
        with explicit.client() as client:
            client.load_model("alpha")  # default policy: latest 1, so version 2 replaces 1
        time.sleep(0.5)
        stop.set()
        for sender in senders:
            sender.result(30)
    assert failures == []
    versions = {version for version, _ in answers}
    assert versions == {"1", "2"}, versions
    assert all(value == (2.0 if version == "1" else 20.0) for version, value in answers)
    assert answers[-1][0] == "2"
    with explicit.client() as client:
        assert _index(client).get(("alpha", "1")) is None
        assert client.get_model_metadata("alpha").versions == ["2"]


def test_unload_waits_for_in_flight_requests(explicit_here: ServerThread) -> None:
    explicit = explicit_here
    # Judged on the server: the request's answer is built before the unload ends, but the
    # two replies race on the way back to their clients.
    version = explicit.server.registry.resolve("sleepy", "")
    succeeded_before = version.stats.snapshot().success.count
    with ThreadPoolExecutor(2) as pool:

        def slow() -> object:
            x = grpcclient.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            steps = grpcclient.InferInput("steps", [1, 1], "INT64")
            steps.set_data_from_numpy(np.full((1, 1), 300_000, np.int64))
            with explicit.client() as client:
                result = client.infer("sleepy", [x, steps])
            return result.as_numpy("y")

        pending = pool.submit(slow)
        deadline = time.monotonic() + 30
        while version.active == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with explicit.client() as client:
            client.unload_model("sleepy")
            succeeded_at_unload = version.stats.snapshot().success.count - succeeded_before
        assert succeeded_at_unload == 1
        np.testing.assert_array_equal(pending.result(60), np.full((1, 4), 2))
    with explicit.client() as client:
        error = _error(lambda: client.infer("sleepy", _x()))
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert "unloaded" in error.message()
        assert not client.is_model_ready("sleepy")
        assert client.is_server_ready()
        assert _index(client)[("sleepy", "1")] == ("UNAVAILABLE", "unloaded")
        client.load_model("sleepy")
        assert client.is_model_ready("sleepy")


@pytest.mark.parametrize(
    ("name", "status", "fragment"),
    [
        ("../outside", "INVALID_ARGUMENT", "not a folder name inside the repository"),
        ("/etc", "INVALID_ARGUMENT", "not a folder name inside the repository"),
        ("alpha/1", "INVALID_ARGUMENT", "not a folder name inside the repository"),
        (".hidden", "INVALID_ARGUMENT", "not a folder name inside the repository"),
        ("", "INVALID_ARGUMENT", "model name is empty"),
        ("absent", "NOT_FOUND", "has no folder 'absent'"),
        ("escape", "INVALID_ARGUMENT", "symlink that leads outside the model repository"),
        ("linked_file", "FAILED_PRECONDITION", "resolves outside the model repository"),
    ],
)
def test_model_names_cannot_escape_the_repository(
    explicit: ServerThread | FrontendsServer,
    repository: Path,
    tmp_path: Path,
    name: str,
    status: str,
    fragment: str,
) -> None:
    outside = tmp_path / "outside"
    _save_scale(outside, "victim", 1, 1.0)
    (repository / "escape").symlink_to(outside / "victim", target_is_directory=True)
    (repository / "linked_file" / "1").mkdir(parents=True)
    (repository / "linked_file" / "1" / "model.onnx").symlink_to(
        outside / "victim" / "1" / "model.onnx"
    )
    with explicit.client() as client:
        error = _error(lambda: client.load_model(name))
    assert error.status() == f"StatusCode.{status}"
    assert fragment in error.message()
    assert str(tmp_path) not in error.message()


def test_model_control_is_refused_outside_explicit_mode(repository: Path) -> None:
    with serve(repository) as server, server.client() as client:
        error = _error(lambda: client.load_model("alpha"))
        assert error.status() == "StatusCode.FAILED_PRECONDITION"
        assert "needs --model-control-mode explicit" in error.message()
        assert _error(lambda: client.unload_model("alpha")).status() == (
            "StatusCode.FAILED_PRECONDITION"
        )
        assert client.is_model_ready("alpha")


def test_poll_mode_follows_the_repository(repository: Path) -> None:
    def wait_for(condition: object, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"poll never {what}"
            time.sleep(0.05)

    poll = serve(repository, model_control_mode="poll", repository_poll_seconds=0.2)
    with poll as server, server.client() as client:
        # A new model appears.
        _save_scale(repository, "gamma", 1, 7.0)
        wait_for(lambda: client.is_model_ready("gamma"), "loaded the new model")
        # A new version of a served model appears, and replaces the old one.
        _save_scale(repository, "alpha", 2, 4.0)
        wait_for(
            lambda: client.infer("alpha", _x()).get_response().model_version == "2",
            "served the new version",
        )
        # A broken change keeps what served before.
        (repository / "beta" / "config.pbtxt").write_text("max_batch_size: [oops\n")
        time.sleep(1.0)
        np.testing.assert_array_equal(client.infer("beta", _x()).as_numpy("y"), np.full((1, 4), 3))
        # A removed model is unloaded.
        shutil.rmtree(repository / "gamma")
        wait_for(lambda: not client.is_model_ready("gamma"), "unloaded the removed model")
        error = _error(lambda: client.load_model("alpha"))
        assert "this server runs in mode 'poll'" in error.message()


def test_a_config_override_cannot_load_a_library_from_outside(
    explicit: ServerThread | FrontendsServer,
) -> None:
    override = {
        "model_operations": {"op_library_filename": ["/usr/lib/x86_64-linux-gnu/libm.so.6"]}
    }
    with explicit.client() as client:
        error = _error(lambda: client.load_model("beta", config=json.dumps(override)))
    assert error.status() == "StatusCode.FAILED_PRECONDITION"
    assert "is outside the model folder" in error.message()
