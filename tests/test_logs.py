"""Logs: the request id on every line about a request, JSON format, the access log."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models as models
from tests.process import ServerProcess, start_on_loopback


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("logs")
    models.save(models.scale(2.0, ["batch", 4]), root, "scaled")
    models.save(models.fixed_reshape(), root, "fragile")  # fails inside onnxruntime for n != 3
    return root


def x(columns: int) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("x", [1, columns], "FP32")
    tensor.set_data_from_numpy(np.ones((1, columns), np.float32))
    return [tensor]


@pytest.fixture(scope="module")
def json_server(repository: Path) -> Iterator[ServerProcess]:
    server = start_on_loopback(repository, "--log-format", "json", "--access-log")
    yield server
    server.kill()


def records(server: ServerProcess) -> list[dict[str, object]]:
    parsed = []
    for line in server.lines:
        line = line.strip()
        if line.startswith("{"):
            parsed.append(json.loads(line))
    return parsed


def test_json_lines_and_access_log_carry_the_clients_request_id(json_server: ServerProcess) -> None:
    url = f"127.0.0.1:{json_server.grpc_port()}"
    with grpcclient.InferenceServerClient(url) as client:
        client.infer("scaled", x(4), headers={"x-request-id": "trace-123"})
        with pytest.raises(InferenceServerException):
            client.infer("fragile", x(4), headers={"x-request-id": "trace-456"})
    # The access line is written after the answer, so after the worker's error line.
    json_server.wait_for('"code": "INTERNAL"')
    lines = records(json_server)
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "batchwise.access"]
    ok = next(line for line in access if line.get("request_id") == "trace-123")
    assert (ok["model"], ok["code"], ok["rows"]) == ("scaled", "OK", 1)
    failed = [line for line in lines if line.get("request_id") == "trace-456"]
    # the onnxruntime failure is logged from the worker thread, and the access line too
    assert any(
        line["level"] == "ERROR" and "onnxruntime run failed" in str(line["message"])
        for line in failed
    ), failed
    assert any(
        line["logger"] == "batchwise.access" and line["code"] == "INTERNAL" for line in failed
    )


def test_a_request_id_is_generated_and_returned(json_server: ServerProcess) -> None:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="scaled")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{json_server.grpc_port()}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ModelInfer.with_call(request)
        returned = dict(call.trailing_metadata())["x-request-id"]
        _, echoed = stub.ModelInfer.with_call(request, metadata=(("x-request-id", "mine-7"),))
        assert dict(echoed.trailing_metadata())["x-request-id"] == "mine-7"
    assert re.fullmatch(r"[0-9a-f]{16}", returned)
    json_server.wait_for(returned)
    access = [line for line in records(json_server) if line.get("request_id") == returned]
    assert access and access[0]["logger"] == "batchwise.access"


def test_access_log_is_off_by_default_and_text_lines_show_ids(repository: Path) -> None:
    server = start_on_loopback(repository)
    try:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port()}") as client:
            client.infer("scaled", x(4), headers={"x-request-id": "quiet-1"})
            with pytest.raises(InferenceServerException):
                client.infer("fragile", x(4), headers={"x-request-id": "loud-2"})
        server.wait_for("[request_id=loud-2]")
        assert "batchwise.access" not in server.log
        assert "quiet-1" not in server.log  # a request that went well logs nothing
    finally:
        server.kill()
