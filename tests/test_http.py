"""The HTTP/REST endpoint through unmodified tritonclient.http (sync and aio) and plain
HTTP requests, in both layouts."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.conftest import FrontendsServer, ServerThread, http_client, serve
from tests.onnx_models import ONNX_TYPES

NUMERIC = [name for name in ONNX_TYPES if name not in ("BYTES", "BF16")]


@pytest.fixture(scope="session")
def server(either_server: ServerThread | FrontendsServer) -> ServerThread | FrontendsServer:
    return either_server


@pytest.fixture()
def client(server: ServerThread | FrontendsServer) -> Iterator[httpclient.InferenceServerClient]:
    with http_client(server.http_url) as connection:
        yield connection


def request(
    url: str,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request, as curl would send it."""
    host, port = url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        answer = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, answer
    finally:
        connection.close()


def infer_json(url: str, model: str, document: dict[str, Any], **headers: str) -> tuple[int, Any]:
    status, _, body = request(
        url, "POST", f"/v2/models/{model}/infer", json.dumps(document), headers
    )
    return status, json.loads(body)


def _input(
    name: str, array: np.ndarray, binary: bool = True, datatype: str | None = None
) -> httpclient.InferInput:
    tensor = httpclient.InferInput(
        name, list(array.shape), datatype or np_to_triton_dtype(array.dtype)
    )
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def _sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(1)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if datatype.startswith("FP"):
        return rng.standard_normal(shape).astype(np.dtype(f"float{datatype[2:]}"))
    integer = np.dtype(datatype.lower())
    info = np.iinfo(integer)
    return rng.integers(info.min, info.max, size=shape, dtype=integer, endpoint=True)


# ------------------------------------------------------------ health, metadata ---


def test_health_metadata_and_config(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("add_sub")
    assert client.is_model_ready("versioned", "3") and not client.is_model_ready("versioned", "1")
    assert not client.is_model_ready("no_such_model") and not client.is_model_ready("broken")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "batchwise" and "statistics" in metadata["extensions"]
    model = client.get_model_metadata("add_sub")
    assert model["name"] == "add_sub" and model["versions"] == ["1"]
    assert model["inputs"][0] == {"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}
    assert client.get_model_metadata("versioned", "2")["versions"] == ["2", "3"]
    config = client.get_model_config("add_sub")
    # 64-bit fields as JSON numbers and defaults written out, as perf_analyzer reads them.
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [16]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert "dynamic_batching" in config


def test_plain_http_health_and_routes(server: ServerThread | FrontendsServer) -> None:
    url = server.http_url
    assert request(url, "GET", "/v2/health/live")[0] == 200
    status, headers, body = request(url, "GET", "/v2/health/ready")
    assert (status, json.loads(body)) == (200, {"ready": True})
    assert headers["content-type"] == "application/json"
    status, _, body = request(url, "GET", "/v2/models/add_sub/ready")
    assert (status, json.loads(body)) == (200, {"name": "add_sub", "ready": True})
    assert request(url, "GET", "/v2/models/broken/ready")[0] == 400
    status, _, body = request(url, "GET", "/v2/nothing/here")
    assert status == 404 and "no such endpoint" in json.loads(body)["error"]
    status, headers, body = request(url, "DELETE", "/v2/models/add_sub")
    assert status == 405 and headers["allow"] == "GET" and "error" in json.loads(body)
    status, _, body = request(url, "GET", "/v2/models/no_such_model")
    assert status == 404 and "no_such_model" in json.loads(body)["error"]
    status, _, body = request(url, "POST", "/v2/repository/index", '{"ready": true}')
    ready = {entry["name"] for entry in json.loads(body)}
    assert status == 200 and "add_sub" in ready and "broken" not in ready


def test_model_control_needs_explicit_mode(client: Any) -> None:
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("add_sub")
    assert refused.value.status() == "400" and "explicit" in refused.value.message()


# ------------------------------------------------------------------ inference ---


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_add_sub(client: Any, binary: bool) -> None:
    a = np.arange(48, dtype=np.float32).reshape(3, 16)
    b = np.full((3, 16), 0.5, dtype=np.float32)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")
    ]
    result = client.infer(
        "add_sub",
        [_input("INPUT0", a, binary), _input("INPUT1", b, not binary)],
        outputs=outputs,
        request_id="r-7",
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response["id"] == "r-7" and response["model_version"] == "1"


def test_outputs_default_to_binary_when_none_is_named(client: Any) -> None:
    a = np.ones((1, 16), dtype=np.float32)
    result = client.infer("add_sub", [_input("INPUT0", a), _input("INPUT1", a)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)
    assert result.get_output("OUTPUT0")["parameters"]["binary_data_size"] == 64


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_numeric_datatype_round_trips(client: Any, binary: bool) -> None:
    arrays = {datatype: _sample(datatype, (2, 5)) for datatype in NUMERIC}
    inputs = [_input(f"IN_{name}", array, binary) for name, array in arrays.items()]
    bf16 = np.array([[1.0, -2.0, 0.5]], dtype=np.float32).repeat(2, axis=0)
    inputs.append(_input("IN_BF16", bf16, True, "BF16"))  # JSON cannot carry BF16
    outputs = [
        httpclient.InferRequestedOutput(f"OUT_{name}", binary_data=binary)
        for name in [*arrays, "BF16"]
    ]
    result = client.infer("identity_numeric", inputs, outputs=outputs)
    for name, array in arrays.items():
        got = result.as_numpy(f"OUT_{name}")
        assert got.dtype == array.dtype, name
        np.testing.assert_array_equal(got, array)
    np.testing.assert_array_equal(result.as_numpy("OUT_BF16"), bf16)


def test_bf16_in_json_is_refused(server: ServerThread | FrontendsServer) -> None:
    document = {"inputs": [{"name": "IN_BF16", "datatype": "BF16", "shape": [1, 1], "data": [1]}]}
    status, answer = infer_json(server.http_url, "identity_numeric", document)
    assert status == 400 and "BF16, which JSON cannot carry" in answer["error"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes(client: Any, binary: bool) -> None:
    strings = np.array([["héllo", ""], ["wörld", "x" * 300]], dtype=np.object_)
    result = client.infer(
        "identity_bytes",
        [_input("IN_BYTES", strings, binary, "BYTES")],
        outputs=[httpclient.InferRequestedOutput("OUT_BYTES", binary_data=binary)],
    )
    got = result.as_numpy("OUT_BYTES")
    assert [[_text(v) for v in row] for row in got] == strings.tolist()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_bytes_in_json_as_base64(server: ServerThread | FrontendsServer) -> None:
    def send(strings: list[str]) -> tuple[int, Any]:
        tensor = {
            "name": "IN_BYTES",
            "datatype": "BYTES",
            "shape": [1, len(strings)],
            "parameters": {"content_type": "base64"},
            "data": strings,
        }
        return infer_json(server.http_url, "identity_bytes", {"inputs": [tensor]})

    status, answer = send(["aMOpbGxv", ""])  # "héllo", ""
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == ["héllo", ""]
    status, answer = send(["AP8="])  # b"\x00\xff": not text, which the model's strings hold
    assert status == 400 and "not valid UTF-8" in answer["error"]
    status, answer = send(["not base64!"])
    assert status == 400 and "element 0 is not base64" in answer["error"]


def test_nested_json_data(server: ServerThread | FrontendsServer) -> None:
    nested = [[float(i + 16 * row) for i in range(16)] for row in range(2)]
    document = {
        "id": "nested",
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [2, 16], "data": nested},
            {"name": "INPUT1", "datatype": "FP32", "shape": [2, 16], "data": [1.0] * 32},
        ],
        "outputs": [{"name": "OUTPUT1"}],
    }
    status, answer = infer_json(server.http_url, "add_sub", document)
    assert status == 200, answer
    (output,) = answer["outputs"]
    assert output["name"] == "OUTPUT1" and output["shape"] == [2, 16]
    assert output["data"] == [value - 1.0 for row in nested for value in row]
    assert answer["id"] == "nested"


def test_request_id_header_is_echoed(server: ServerThread | FrontendsServer) -> None:
    document = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0] * 6}]}
    status, headers, _ = request(
        server.http_url,
        "POST",
        "/v2/models/fixed_shape/infer",
        json.dumps(document),
        {"x-request-id": "trace-42"},
    )
    assert status == 200 and headers["x-request-id"] == "trace-42"


def test_compressed_request_and_response(client: Any) -> None:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    for request_algorithm, response_algorithm in (("gzip", "deflate"), ("deflate", "gzip")):
        result = client.infer(
            "add_sub",
            [_input("INPUT0", a), _input("INPUT1", a, binary=False)],
            request_compression_algorithm=request_algorithm,
            response_compression_algorithm=response_algorithm,
        )
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)


def test_statistics_count_http_requests(client: Any) -> None:
    def successes() -> int:
        stats = client.get_inference_statistics("fixed_shape")["model_stats"]
        return sum(entry["inference_stats"]["success"]["count"] for entry in stats)

    before = successes()
    x = np.zeros((2, 3), dtype=np.float32)
    for _ in range(3):
        client.infer("fixed_shape", [_input("x", x)])
    assert successes() == before + 3
    everything = client.get_inference_statistics()["model_stats"]
    assert {"add_sub", "fixed_shape"} <= {entry["name"] for entry in everything}


def test_aio_client(server: ServerThread | FrontendsServer) -> None:
    async def run() -> None:
        client = aiohttpclient.InferenceServerClient(server.http_url)
        try:
            assert await client.is_server_ready()
            assert await client.is_model_ready("add_sub")
            assert (await client.get_model_metadata("add_sub"))["platform"] == "onnxruntime_onnx"
            a = np.ones((2, 16), dtype=np.float32)
            tasks = [
                client.infer("add_sub", [_input("INPUT0", a * k), _input("INPUT1", a)])
                for k in range(8)
            ]
            for k, result in enumerate(await asyncio.gather(*tasks)):
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * k + a)
            stats = await client.get_inference_statistics("add_sub")
            assert stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 8
            with pytest.raises(InferenceServerException) as refused:
                await client.infer("add_sub", [_input("INPUT0", a)])
            assert refused.value.status() == "400" and "INPUT1" in refused.value.message()
        finally:
            await client.close()

    asyncio.run(run())


# --------------------------------------------------------------------- errors ---


def test_errors_carry_triton_statuses(client: Any) -> None:
    a = np.ones((1, 16), dtype=np.float32)
    cases = [
        (lambda: client.infer("no_such_model", [_input("INPUT0", a)]), "404", "no_such_model"),
        (lambda: client.infer("broken", [_input("INPUT0", a)]), "503", "broken"),
        (
            lambda: client.infer("add_sub", [_input("INPUT0", a), _input("INPUT1", a[:, :8])]),
            "400",
            "INPUT1",
        ),
        (
            lambda: client.infer(
                "add_sub", [_input("INPUT0", a), _input("INPUT1", a.astype(np.float64))]
            ),
            "400",
            "FP64",
        ),
        (lambda: client.get_model_config("add_sub", "7"), "404", "7"),
    ]
    for call, status, words in cases:
        with pytest.raises(InferenceServerException) as failed:
            call()
        assert failed.value.status() == status, failed.value.message()
        assert words in failed.value.message()


def _binary_request(document: dict[str, Any], payload: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(document).encode()
    return header + payload, {"Inference-Header-Content-Length": str(len(header))}


_ONE_ROW = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16]}
_SECOND = {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}

MALFORMED: list[tuple[str, bytes | str, dict[str, str], str]] = [
    ("not JSON", b"{inputs: ", {}, "not valid JSON"),
    ("JSON array", b"[1, 2]", {}, "must be a JSON object"),
    ("no inputs", b"{}", {}, "has no 'inputs'"),
    ("inputs not a list", b'{"inputs": 3}', {}, "'inputs' must be an array"),
    ("input not an object", b'{"inputs": [3]}', {}, "inputs[0] must be a JSON object"),
    (
        "no datatype",
        json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "data": []}]}),
        {},
        "has no 'datatype'",
    ),
    (
        "bad shape",
        json.dumps({"inputs": [{**_ONE_ROW, "shape": [1, -16], "data": []}]}),
        {},
        "dimensions are non-negative integers",
    ),
    (
        "too few values",
        json.dumps({"inputs": [{**_ONE_ROW, "data": [1.0] * 15}, _SECOND]}),
        {},
        "has 15 values in 'data' but shape [1, 16] needs 16",
    ),
    (
        "strings for FP32",
        json.dumps({"inputs": [{**_ONE_ROW, "data": ["a"] * 16}, _SECOND]}),
        {},
        "holds strings; expected numbers",
    ),
    (
        "ragged nesting",
        json.dumps({"inputs": [{**_ONE_ROW, "data": [[1.0] * 15, [1.0]]}, _SECOND]}),
        {},
        "does not match shape [1, 16]",
    ),
    (
        "int range",
        json.dumps(
            {"inputs": [{"name": "IN_INT8", "datatype": "INT8", "shape": [1, 1], "data": [300]}]}
        ),
        {},
        "outside the INT8 range",
    ),
    (
        "no data at all",
        json.dumps({"inputs": [_ONE_ROW, _SECOND]}),
        {},
        "has no 'data'",
    ),
    (
        "header length not a number",
        json.dumps({"inputs": [_ONE_ROW]}),
        {"Inference-Header-Content-Length": "abc"},
        "Inference-Header-Content-Length is 'abc'",
    ),
    (
        "header length past the body",
        b"{}",
        {"Inference-Header-Content-Length": "99999999999999999999"},
        "says 99999999999999999999 bytes of JSON but the body has 2",
    ),
    (
        "binary size past the body",
        *_binary_request(
            {"inputs": [{**_ONE_ROW, "parameters": {"binary_data_size": 2**62}}, _SECOND]},
            b"\0" * 64,
        ),
        "only 64 bytes of binary data remain",
    ),
    (
        "binary size that disagrees with the shape",
        *_binary_request(
            {"inputs": [{**_ONE_ROW, "parameters": {"binary_data_size": 60}}, _SECOND]},
            b"\0" * 60,
        ),
        "needs 64 bytes",
    ),
    (
        "bytes left over",
        *_binary_request(
            {"inputs": [{**_ONE_ROW, "parameters": {"binary_data_size": 64}}, _SECOND]},
            b"\0" * 70,
        ),
        "6 bytes after the JSON",
    ),
    (
        "data and binary both",
        *_binary_request(
            {
                "inputs": [
                    {**_ONE_ROW, "data": [0.0] * 16, "parameters": {"binary_data_size": 64}},
                    _SECOND,
                ]
            },
            b"\0" * 64,
        ),
        "both 'data' and parameter 'binary_data_size'",
    ),
    (
        "gzip that is not",
        b"this is not gzip",
        {"Content-Encoding": "gzip"},
        "cannot be decompressed",
    ),
    (
        "truncated gzip",
        gzip.compress(json.dumps({"inputs": []}).encode())[:-12],
        {"Content-Encoding": "gzip"},
        "ends before its compressed stream",
    ),
    (
        "parameter of a bad kind",
        json.dumps({"inputs": [], "parameters": {"x": [1]}}),
        {},
        "parameters are booleans, numbers or strings",
    ),
]


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_bodies_are_400(
    server: ServerThread | FrontendsServer, body: bytes | str, headers: dict[str, str], message: str
) -> None:
    status, _, answer = request(server.http_url, "POST", "/v2/models/add_sub/infer", body, headers)
    document = json.loads(answer)
    assert status == 400, document
    assert message in document["error"]
    # The server is still there.
    assert request(server.http_url, "GET", "/v2/health/live")[0] == 200


def test_unsupported_features_are_501(server: ServerThread | FrontendsServer) -> None:
    document = {"inputs": [], "parameters": {"sequence_id": 3}}
    status, answer = infer_json(server.http_url, "add_sub", document)
    assert status == 501 and "sequence batching" in answer["error"]


def test_unknown_content_encoding_is_415(server: ServerThread | FrontendsServer) -> None:
    status, _, answer = request(
        server.http_url, "POST", "/v2/models/add_sub/infer", b"{}", {"Content-Encoding": "br"}
    )
    assert status == 415 and "gzip or deflate" in json.loads(answer)["error"]


def test_oversized_headers_close_the_connection(server: ServerThread | FrontendsServer) -> None:
    status, _, _ = request(
        server.http_url, "GET", "/v2/health/live", headers={"x-big": "a" * 70_000}
    )
    assert status == 400
    assert request(server.http_url, "GET", "/v2/health/live")[0] == 200


def test_declared_body_over_the_limit_is_refused_unread(small_server: ServerThread) -> None:
    """Content-Length above --max-message-bytes: 413 before a byte of the body is read."""
    host, port = small_server.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        answer = connection.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "--max-message-bytes" in answer


def test_streamed_body_over_the_limit_is_413(small_server: ServerThread) -> None:
    status, _, answer = request(
        small_server.http_url, "POST", "/v2/models/add_sub/infer", b"{" + b" " * 70_000 + b"}"
    )
    assert status == 413 and "65536 bytes" in json.loads(answer)["error"]
    compressed = gzip.compress(b"{" + b" " * 200_000 + b"}")
    status, _, answer = request(
        small_server.http_url,
        "POST",
        "/v2/models/add_sub/infer",
        compressed,
        {"Content-Encoding": "gzip"},
    )
    assert status == 413, answer


@pytest.fixture(scope="module")
def small_server(standard_repository: Path) -> Iterator[ServerThread]:
    with serve(standard_repository, max_message_bytes=64 * 1024) as running:
        yield running


# ------------------------------------------------------------ the KServe SDK ---

ROOT = Path(__file__).resolve().parent.parent
KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"


def test_kserve_sdk_rest_client(server: ServerThread | FrontendsServer) -> None:
    """kserve 0.21's InferenceRESTClient, in its own environment (make install-test)."""
    assert KSERVE_PYTHON.exists(), "the KServe SDK environment is missing: run make install-test"
    run = subprocess.run(
        [
            str(KSERVE_PYTHON),
            str(ROOT / "tests" / "clients" / "kserve_rest.py"),
            f"http://{server.http_url}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.splitlines()[-1])
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    expected = (np.arange(32, dtype=np.float32).reshape(2, 16) + 1).tolist()
    for binary in (False, True):
        answer = seen[f"add_sub binary={binary}"]
        assert answer["id"] == "kserve-1" and answer["outputs"] == {"OUTPUT0": expected}
    assert seen["bytes"] == ["héllo", "wörld"]
    assert seen["unknown model"] == 404
