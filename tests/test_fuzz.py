"""Property-based fuzzing of ModelInfer through the wire: any message, never a crash.

Hypothesis builds requests from a plan that is mostly wrong in some way (names,
datatypes, shapes with negative or enormous dims, raw lengths, typed contents,
BYTES payloads with lying length prefixes, requested outputs, parameters) and
sometimes entirely right. Every answer must be a deliberate one: OK with the
right data for a valid request, otherwise a client-error status with a message;
never INTERNAL or UNKNOWN. The server must answer correctly afterwards. Each run
sends at least FUZZ_REQUESTS requests.
"""

from __future__ import annotations

import http.client
import json
import struct
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests import onnx_models as models
from tests.conftest import LAYOUTS, FrontendsServer, ServerThread, serve
from tests.process import start_on_loopback

FUZZ_REQUESTS = 5000
REQUESTS_PER_EXAMPLE = 5
EXAMPLES = FUZZ_REQUESTS // REQUESTS_PER_EXAMPLE
Request = service_pb2.ModelInferRequest

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
DATATYPES = [*NUMERIC, "BYTES", "UINT16", "UINT32", "UINT64", "BF16", "fp32", "", "FLOAT", "Ω"]
TYPED_FIELDS = [
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
]
# Client mistakes and refusals; INTERNAL and UNKNOWN would be server bugs.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}
MAX_ELEMENTS = 4096
sent: list[int] = []


@pytest.fixture(scope="module", params=LAYOUTS)
def fuzz_server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ServerThread | FrontendsServer]:
    """In one process, and behind two front ends (which decode everything the fuzzer sends)."""
    root: Path = tmp_path_factory.mktemp("fuzz-repository")
    models.save(models.identity(list(NUMERIC)), root, "numeric")
    models.save(models.identity(["BYTES"]), root, "text")
    if request.param == LAYOUTS[0]:
        with serve(root, max_request_elements=MAX_ELEMENTS, max_message_bytes=1 << 20) as server:
            yield server
        return
    frontends = FrontendsServer(
        start_on_loopback(
            root,
            "--frontend-processes",
            "2",
            "--max-request-elements",
            str(MAX_ELEMENTS),
            "--max-message-bytes",
            str(1 << 20),
        )
    )
    yield frontends
    assert frontends.stop() == 0, frontends.process.log


@pytest.fixture(scope="module")
def fuzz_stub(
    fuzz_server: ServerThread | FrontendsServer,
) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(fuzz_server.url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@dataclass
class Plan:
    request: Request
    # The expected outputs when every part of the request is right; None when it is not.
    expected: dict[str, np.ndarray] | None
    # A mistake that no server may accept (unknown model, bad name, dtype, rank, dim).
    must_fail: bool


def _input_names(model: str) -> list[str]:
    if model == "text":
        return ["IN_BYTES"]
    return [f"IN_{name}" for name in NUMERIC]


def _prefixed(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


@st.composite
def valid_tensor(draw: st.DrawFn, model: str, name: str, rows: int) -> tuple[bytes, np.ndarray]:
    width = draw(st.integers(1, 6))
    if model == "text":
        # ONNX string tensors hold UTF-8 text: other bytes are a client mistake.
        utf8 = st.text(max_size=6).map(str.encode)
        elements = draw(st.lists(utf8, min_size=rows * width, max_size=rows * width))
        array = np.array(elements, dtype=object).reshape(rows, width)
        return _prefixed(elements), array
    dtype = NUMERIC[name.removeprefix("IN_")]
    raw = draw(
        st.binary(
            min_size=rows * width * np.dtype(dtype).itemsize,
            max_size=rows * width * np.dtype(dtype).itemsize,
        )
    )
    array = np.frombuffer(raw, dtype=np.uint8).copy()
    if dtype is np.bool_:
        array = (array % 2).astype(np.uint8)
        raw = array.tobytes()
    return raw, np.frombuffer(raw, dtype=dtype).reshape(rows, width)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    model = draw(st.sampled_from(["numeric", "text", "numeric", "text", "absent", ""]))
    request = Request(model_name=model, id=draw(st.text(max_size=8)))
    if draw(st.booleans()):
        request.model_version = draw(st.sampled_from(["", "1", "2", "0", "-1", "x", "²", "1" * 30]))
    names = _input_names(model) if model in ("numeric", "text") else ["x"]
    if model == "numeric" and draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    rows = draw(st.integers(1, 3))
    expected: dict[str, np.ndarray] | None = {} if model in ("numeric", "text") else None
    if model == "numeric" and len(names) != len(NUMERIC):
        expected = None  # the identity model needs every input
    must_fail = model not in ("numeric", "text") or request.model_version not in ("", "1")
    if must_fail:
        expected = None
    mistakes = draw(st.integers(0, 3))  # 0: a valid request (where the model allows)
    for position, name in enumerate(names):
        raw, array = draw(
            valid_tensor(
                model if model == "text" else "numeric",
                name if model == "numeric" else "IN_FP32",
                rows,
            )
        )
        datatype = "BYTES" if model == "text" else name.removeprefix("IN_")
        shape = list(array.shape)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
        if expected is not None:
            expected["OUT_" + name.removeprefix("IN_")] = array
        if mistakes and draw(st.booleans()):
            expected = None
            kind = draw(
                st.sampled_from(["name", "datatype", "shape", "raw", "typed", "prefix", "params"])
            )
            if kind == "name":
                tensor.name = draw(
                    st.sampled_from(["", "IN_fp32", "OUT_FP32", "x" * 200, name + " "])
                )
                must_fail = True
            elif kind == "datatype":
                tensor.datatype = draw(st.sampled_from(DATATYPES))
                must_fail = must_fail or tensor.datatype != datatype
            elif kind == "shape":
                del tensor.shape[:]
                dims = draw(
                    st.lists(
                        st.one_of(
                            st.integers(-3, 8),
                            st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]),
                        ),
                        max_size=5,
                    )
                )
                tensor.shape.extend(dims)
                must_fail = must_fail or len(dims) != 2 or min(dims) < 1 or max(dims) > 2**20
            elif kind == "raw":
                request.raw_input_contents[position] = draw(st.binary(max_size=64))
            elif kind == "typed":
                field = draw(st.sampled_from(TYPED_FIELDS))
                values = {
                    "bool_contents": st.booleans(),
                    "int_contents": st.integers(-(2**31), 2**31 - 1),
                    "int64_contents": st.integers(-(2**63), 2**63 - 1),
                    "uint_contents": st.integers(0, 2**32 - 1),
                    "uint64_contents": st.integers(0, 2**64 - 1),
                    "fp32_contents": st.floats(width=32, allow_nan=True),
                    "fp64_contents": st.floats(allow_nan=True),
                    "bytes_contents": st.binary(max_size=8),
                }[field]
                getattr(tensor.contents, field).extend(draw(st.lists(values, max_size=12)))
                if draw(st.booleans()):
                    request.raw_input_contents[position] = b""
            elif kind == "prefix":
                count = draw(st.integers(0, 6))
                pieces = [
                    struct.pack("<I", draw(st.sampled_from([0, 1, 5, 2**31, 2**32 - 1])))
                    + draw(st.binary(max_size=6))
                    for _ in range(count)
                ]
                request.raw_input_contents[position] = b"".join(pieces) + draw(
                    st.binary(max_size=3)
                )
            else:
                key = draw(
                    st.sampled_from(
                        ["priority", "timeout", "sequence_id", "binary_data_output", "x", ""]
                    )
                )
                value = request.parameters[key]
                choice = draw(st.integers(0, 2))
                if choice == 0:
                    value.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
                elif choice == 1:
                    value.string_param = draw(st.text(max_size=6))
                else:
                    value.bool_param = draw(st.booleans())
    if draw(st.booleans()):
        outputs = ["OUT_" + name.removeprefix("IN_") for name in names]
        wanted = draw(st.lists(st.sampled_from([*outputs, "OUT_nope", ""]), max_size=3))
        for output in wanted:
            request.outputs.add(name=output)
        if expected is not None:
            if len(set(wanted)) != len(wanted) or not set(wanted) <= set(outputs):
                expected = None
            elif wanted:
                expected = {name: expected[name] for name in wanted}
    return Plan(request, expected, must_fail)


def _decode(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    decoded = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            elements, offset = [], 0
            while offset < len(raw):
                (length,) = struct.unpack_from("<I", raw, offset)
                elements.append(raw[offset + 4 : offset + 4 + length])
                offset += 4 + length
            decoded[tensor.name] = np.array(elements, dtype=object).reshape(tuple(tensor.shape))
        else:
            dtype = NUMERIC[tensor.datatype]
            decoded[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape))
    return decoded


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
@given(batch=st.lists(plans(), min_size=REQUESTS_PER_EXAMPLE, max_size=REQUESTS_PER_EXAMPLE))
def _fuzz(stub: service_pb2_grpc.GRPCInferenceServiceStub, batch: list[Plan]) -> None:
    for plan in batch:
        sent.append(1)
        try:
            response = stub.ModelInfer(plan.request, timeout=30)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            details = error.details() or ""  # type: ignore[attr-defined]
            assert code in CLIENT_ERRORS, (code, details, plan.request)
            assert details, f"{code} without a message"
            assert plan.expected is None, (code, details, plan.request)
            if plan.request.model_name not in ("numeric", "text"):
                assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
            continue
        assert not plan.must_fail, ("accepted a request that must fail", plan.request)
        outputs = _decode(response)
        if plan.expected is not None:
            assert set(outputs) == set(plan.expected)
            for name, array in plan.expected.items():
                np.testing.assert_array_equal(outputs[name], array)


def test_malformed_requests_never_crash_the_server_or_answer_internal(
    fuzz_server: ServerThread | FrontendsServer,
    fuzz_stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    _fuzz(fuzz_stub)
    assert len(sent) >= FUZZ_REQUESTS
    # Still alive and still right.
    with fuzz_server.client() as client:
        assert client.is_server_live() and client.is_server_ready()
        for model in ("numeric", "text"):
            statistics = client.get_inference_statistics(model)
            assert statistics.model_stats[0].inference_stats.success.count > 0, model


DAMAGED_REQUESTS = 500
damaged_sent: list[int] = []


@settings(
    max_examples=DAMAGED_REQUESTS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    plan=plans(),
    flips=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 40),
    large=st.booleans(),
)
def _damaged(
    call: grpc.UnaryUnaryMultiCallable,
    plan: Plan,
    flips: list[tuple[int, int]],
    cut: int,
    large: bool,
) -> None:
    head = bytearray(plan.request.SerializeToString())
    for offset, value in flips:
        if head:
            head[offset % len(head)] = value
    # A large raw entry sends the request down the zero-copy path (service/grpc_api/wire.py).
    tail = Request(raw_input_contents=[bytes(70_000)]).SerializeToString() if large else b""
    body = bytes(head + tail)
    damaged_sent.append(1)
    try:
        service_pb2.ModelInferResponse.FromString(call(body[: len(body) - cut], timeout=30))
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
        details = error.details() or ""  # type: ignore[attr-defined]
        assert code in CLIENT_ERRORS, (code, details, body[:200])
        assert details, f"{code} without a message"


def test_damaged_wire_bytes_get_client_errors(
    fuzz_server: ServerThread | FrontendsServer,
) -> None:
    """Requests damaged on the wire (flipped bytes, cut short): never UNKNOWN or INTERNAL."""
    with grpc.insecure_channel(fuzz_server.url) as channel:
        _damaged(channel.unary_unary("/inference.GRPCInferenceService/ModelInfer"))
    assert len(damaged_sent) >= DAMAGED_REQUESTS
    with fuzz_server.client() as client:
        assert client.is_server_live() and client.is_server_ready()


# ---------------------------------------------------------------- over HTTP ---

HTTP_REQUESTS = 1000
HTTP_CLIENT_ERRORS = {400, 404, 413, 415, 501}
http_sent: list[int] = []


class _Connection:
    """One keep-alive HTTP connection, reopened when the server closes it."""

    def __init__(self, url: str) -> None:
        self._host, port = url.split(":")
        self._port = int(port)
        self._connection: http.client.HTTPConnection | None = None

    def post(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(self._host, self._port, timeout=30)
            try:
                self._connection.request("POST", path, body=body, headers=headers)
                response = self._connection.getresponse()
                answer = response.read()
                found = {key.lower(): value for key, value in response.getheaders()}
                if found.get("connection") == "close":
                    self.close()
                return response.status, found, answer
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _http_body(request: Request) -> tuple[bytes, dict[str, str]]:
    """The plan's request in the HTTP protocol: raw entries as binary data after the JSON,
    typed contents as JSON data, the same mistakes."""
    inputs, payload = [], []
    raw = list(request.raw_input_contents)
    for position, tensor in enumerate(request.inputs):
        entry: dict[str, object] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        typed = tensor.contents.ListFields()
        if typed:
            values = list(typed[0][1])
            entry["data"] = [v.decode("latin-1") if isinstance(v, bytes) else v for v in values]
        elif position < len(raw):
            entry["parameters"] = {"binary_data_size": len(raw[position])}
            payload.append(raw[position])
        inputs.append(entry)
    document: dict[str, object] = {"id": request.id, "inputs": inputs}
    if request.outputs:
        document["outputs"] = [
            {"name": output.name, "parameters": {"binary_data": True}} for output in request.outputs
        ]
    parameters = {
        key: getattr(value, value.WhichOneof("parameter_choice") or "bool_param")
        for key, value in request.parameters.items()
    }
    parameters.setdefault("binary_data_output", True)
    if not isinstance(parameters["binary_data_output"], bool):
        parameters["binary_data_output"] = True
    document["parameters"] = parameters
    header = json.dumps(document).encode()
    return header + b"".join(payload), {"Inference-Header-Content-Length": str(len(header))}


def _http_outputs(headers: dict[str, str], body: bytes) -> dict[str, np.ndarray]:
    length = int(headers.get("inference-header-content-length", len(body)))
    document = json.loads(body[:length])
    offset, decoded = length, {}
    for output in document["outputs"]:
        size = output["parameters"]["binary_data_size"]
        raw = body[offset : offset + size]
        offset += size
        response = service_pb2.ModelInferResponse()
        response.outputs.add(
            name=output["name"], datatype=output["datatype"], shape=output["shape"]
        )
        response.raw_output_contents.append(raw)
        decoded.update(_decode(response))
    return decoded


@settings(
    max_examples=HTTP_REQUESTS // REQUESTS_PER_EXAMPLE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(plans(), min_size=REQUESTS_PER_EXAMPLE, max_size=REQUESTS_PER_EXAMPLE))
def _fuzz_http(connection: _Connection, batch: list[Plan]) -> None:
    for plan in batch:
        http_sent.append(1)
        body, headers = _http_body(plan.request)
        model = urllib.parse.quote(plan.request.model_name, safe="")
        version = plan.request.model_version
        path = (
            f"/v2/models/{model}"
            + (f"/versions/{urllib.parse.quote(version, safe='')}" if version else "")
            + "/infer"
        )
        status, answer_headers, answer = connection.post(path, body, headers)
        if status != 200:
            assert status in HTTP_CLIENT_ERRORS, (status, answer[:300], plan.request)
            assert json.loads(answer)["error"], f"{status} without a message"
            assert plan.expected is None, (status, answer[:300], plan.request)
            continue
        assert not plan.must_fail, ("accepted a request that must fail", plan.request)
        outputs = _http_outputs(answer_headers, answer)
        if plan.expected is not None:
            assert set(outputs) == set(plan.expected)
            for name, array in plan.expected.items():
                np.testing.assert_array_equal(outputs[name], array)


@settings(
    max_examples=DAMAGED_REQUESTS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    plan=plans(),
    flips=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 40),
    header_length=st.one_of(
        st.none(), st.integers(-5, 2**70).map(str), st.sampled_from(["", " 1", "0x10", "١"])
    ),
    encoding=st.sampled_from([None, "gzip", "deflate", "identity", "zstd"]),
)
def _damaged_http(
    connection: _Connection,
    plan: Plan,
    flips: list[tuple[int, int]],
    cut: int,
    header_length: str | None,
    encoding: str | None,
) -> None:
    body, headers = _http_body(plan.request)
    damaged = bytearray(body)
    for offset, value in flips:
        if damaged:
            damaged[offset % len(damaged)] = value
    sent_headers: dict[str, str | bytes] = dict(headers)
    if header_length is not None:  # as bytes: any character, as a hostile client may send
        sent_headers["Inference-Header-Content-Length"] = header_length.encode()
    if encoding is not None:
        sent_headers["Content-Encoding"] = encoding
    damaged_sent.append(1)
    status, _, answer = connection.post(
        "/v2/models/numeric/infer", bytes(damaged[: len(damaged) - cut]), sent_headers
    )
    if status != 200:
        assert status in HTTP_CLIENT_ERRORS, (status, answer[:300])
        assert json.loads(answer)["error"]


def test_http_requests_never_crash_the_server_or_answer_500(
    fuzz_server: ServerThread | FrontendsServer,
) -> None:
    """The same plans as JSON and binary HTTP bodies, then damaged ones: only 4xx/501."""
    connection = _Connection(fuzz_server.http_url)
    try:
        _fuzz_http(connection)
        _damaged_http(connection)
    finally:
        connection.close()
    assert len(http_sent) >= HTTP_REQUESTS
    with fuzz_server.client() as client:
        assert client.is_server_live() and client.is_server_ready()
