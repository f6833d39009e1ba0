"""ModelInfer and ModelStreamInfer through unmodified tritonclient and its raw stub."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.conftest import FrontendsServer, ServerThread
from tests.onnx_models import ONNX_TYPES


@pytest.fixture(scope="session")
def server(either_server: ServerThread | FrontendsServer) -> ServerThread | FrontendsServer:
    """Every test here runs against one process and against two front ends."""
    return either_server


NUMERIC = [name for name in ONNX_TYPES if name not in ("BYTES", "BF16")]


def _input(name: str, array: np.ndarray, datatype: str | None = None) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(
        name, list(array.shape), datatype or np_to_triton_dtype(array.dtype)
    )
    tensor.set_data_from_numpy(array)
    return tensor


def _sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = {"BOOL": np.bool_, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.get(
        datatype
    )
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype is not None:
        return rng.standard_normal(shape).astype(dtype)
    integer = np.dtype(datatype.lower())
    info = np.iinfo(integer)
    return rng.integers(info.min, info.max, size=shape, dtype=integer, endpoint=True)


def test_add_sub_raw(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(48, dtype=np.float32).reshape(3, 16)
    b = np.full((3, 16), 0.5, dtype=np.float32)
    result = client.infer("add_sub", [_input("INPUT0", a), _input("INPUT1", b)], request_id="r-1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response.id == "r-1"
    assert response.model_name == "add_sub" and response.model_version == "1"
    assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert len(response.raw_output_contents) == 2


@pytest.mark.parametrize("datatype", NUMERIC)
def test_every_numeric_dtype_round_trips(
    client: grpcclient.InferenceServerClient, datatype: str
) -> None:
    array = _sample(datatype, (2, 5))
    result = client.infer(
        "identity_numeric",
        [
            _input(f"IN_{name}", array if name == datatype else _sample(name, (2, 5)), name)
            if name != "BF16"
            else _input("IN_BF16", np.zeros((2, 5), np.float32), "BF16")
            for name in ONNX_TYPES
            if name != "BYTES"
        ],
        outputs=[grpcclient.InferRequestedOutput(f"OUT_{datatype}")],
    )
    output = result.as_numpy(f"OUT_{datatype}")
    assert output.dtype == array.dtype
    np.testing.assert_array_equal(output, array)


def test_bf16_round_trips_bit_exact(client: grpcclient.InferenceServerClient) -> None:
    """BF16 travels as 16-bit patterns; tritonclient converts from/to float32."""
    values = np.array([[1.0, -2.5, 3.140625, 0.0, 65280.0]], dtype=np.float32)
    inputs = [
        _input(f"IN_{name}", _sample(name, (1, 5)), name)
        for name in ONNX_TYPES
        if name not in ("BYTES", "BF16")
    ] + [_input("IN_BF16", values, "BF16")]
    result = client.infer(
        "identity_numeric", inputs, outputs=[grpcclient.InferRequestedOutput("OUT_BF16")]
    )
    np.testing.assert_array_equal(result.as_numpy("OUT_BF16"), values)


def test_bytes_round_trip(client: grpcclient.InferenceServerClient) -> None:
    strings = np.array(
        [[b"hello", b"", "wörld ✓".encode()], [b"a\x00b", b"x" * 1000, b"z"]],
        dtype=np.object_,
    )
    result = client.infer("identity_bytes", [_input("IN_BYTES", strings, "BYTES")])
    output = result.as_numpy("OUT_BYTES")
    assert output.shape == (2, 3)
    assert output.tolist() == strings.tolist()


def test_requested_output_subset_and_order(client: grpcclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.float32)
    inputs = [_input("INPUT0", a), _input("INPUT1", a)]
    only_second = client.infer(
        "add_sub", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")]
    )
    assert [o.name for o in only_second.get_response().outputs] == ["OUTPUT1"]
    assert only_second.as_numpy("OUTPUT0") is None
    reversed_order = client.infer(
        "add_sub",
        inputs,
        outputs=[
            grpcclient.InferRequestedOutput("OUTPUT1"),
            grpcclient.InferRequestedOutput("OUTPUT0"),
        ],
    )
    assert [o.name for o in reversed_order.get_response().outputs] == ["OUTPUT1", "OUTPUT0"]
    np.testing.assert_array_equal(reversed_order.as_numpy("OUTPUT0"), 2 * a)


def test_non_batching_fixed_shape(client: grpcclient.InferenceServerClient) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = client.infer("fixed_shape", [_input("x", x)])
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * x)


def test_versions_are_routed(client: grpcclient.InferenceServerClient) -> None:
    """versioned/<v> multiplies by v; latest 2 of 3 versions are served."""
    x = np.ones((1, 4), dtype=np.float32)
    latest = client.infer("versioned", [_input("x", x)])
    assert latest.get_response().model_version == "3"
    np.testing.assert_array_equal(latest.as_numpy("y"), 3 * x)
    second = client.infer("versioned", [_input("x", x)], model_version="2")
    np.testing.assert_array_equal(second.as_numpy("y"), 2 * x)
    with pytest.raises(InferenceServerException) as absent:
        client.infer("versioned", [_input("x", x)], model_version="1")
    assert absent.value.status() == "StatusCode.NOT_FOUND"


def _typed_request(model: str) -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest(model_name=model, id="typed")


def test_typed_contents_input(stub: object) -> None:
    """Clients other than tritonclient may send values in the typed `contents` fields."""
    request = _typed_request("add_sub")
    for name, start in (("INPUT0", 0), ("INPUT1", 100)):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[2, 16])
        tensor.contents.fp32_contents.extend(float(v) for v in range(start, start + 32))
    response = stub.ModelInfer(request)  # type: ignore[attr-defined]
    out0 = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 16)
    expected = np.arange(32, dtype=np.float32) + np.arange(100, 132, dtype=np.float32)
    np.testing.assert_array_equal(out0.reshape(-1), expected)


TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
WIRE_DTYPES = {
    "BOOL": "?",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "FP32": "<f4",
    "FP64": "<f8",
}


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("BOOL", [True, False, True]),
        ("INT8", [-128, 0, 127]),
        ("INT16", [-32768, 1, 32767]),
        ("INT32", [-(2**31), 2, 2**31 - 1]),
        ("INT64", [-(2**63), 3, 2**63 - 1]),
        ("UINT8", [0, 1, 255]),
        ("UINT16", [0, 2, 65535]),
        ("UINT32", [0, 3, 2**32 - 1]),
        ("UINT64", [0, 4, 2**64 - 1]),
        ("FP32", [0.5, -1.25, 3.0]),
        ("FP64", [0.1, -2.2, 1e300]),
        ("BYTES", [b"typed", b"", "ü".encode()]),
    ],
)
def test_typed_contents_for_each_type(stub: object, datatype: str, values: list) -> None:  # type: ignore[type-arg]
    """Every input of identity_typed travels in its typed field; extremes survive."""
    request = _typed_request("identity_typed")
    for name, field in TYPED_FIELDS.items():
        tensor = request.inputs.add(name=f"IN_{name}", datatype=name, shape=[1, 3])
        filler = [b"", b"", b""] if name == "BYTES" else [0, 0, 0]
        getattr(tensor.contents, field).extend(values if name == datatype else filler)
    request.outputs.add(name=f"OUT_{datatype}")
    response = stub.ModelInfer(request)  # type: ignore[attr-defined]
    raw = response.raw_output_contents[0]
    if datatype == "BYTES":
        from tritonclient.utils import deserialize_bytes_tensor

        assert deserialize_bytes_tensor(raw).tolist() == values
    else:
        assert np.frombuffer(raw, dtype=WIRE_DTYPES[datatype]).tolist() == values


def test_stream_infer(client: grpcclient.InferenceServerClient) -> None:
    """ModelStreamInfer: responses carry their request id; errors come in error_message."""
    results: queue.Queue = queue.Queue()  # type: ignore[type-arg]
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for index in range(5):
            x = np.full((1, 16), index, dtype=np.float32)
            client.async_stream_infer(
                "add_sub", [_input("INPUT0", x), _input("INPUT1", x)], request_id=f"s-{index}"
            )
        client.async_stream_infer(
            "add_sub", [_input("INPUT0", np.ones((1, 16), np.float32))], request_id="bad"
        )
        received = [results.get(timeout=30) for _ in range(6)]
    finally:
        client.stop_stream()
    good = {r.get_response().id: r for r, e in received if e is None}
    assert sorted(good) == [f"s-{i}" for i in range(5)]
    for index in range(5):
        np.testing.assert_array_equal(
            good[f"s-{index}"].as_numpy("OUTPUT0"), np.full((1, 16), 2 * index, np.float32)
        )
    errors = [e for r, e in received if e is not None]
    assert len(errors) == 1 and "INPUT1" in errors[0].message()


def test_large_message_above_grpc_default_limit(client: grpcclient.InferenceServerClient) -> None:
    """gRPC's default receive limit is 4 MiB; tritonclient sends up to INT32_MAX."""
    x = np.random.default_rng(1).standard_normal((4, 400_000)).astype(np.float32)  # 6.4 MB
    inputs = [
        _input(f"IN_{name}", x if name == "FP32" else _sample(name, (4, 1)), name)
        for name in ONNX_TYPES
        if name not in ("BYTES", "BF16")
    ]
    # every input shares the batch dimension but the second dimension is free per input
    inputs.append(_input("IN_BF16", np.zeros((4, 1), np.float32), "BF16"))
    result = client.infer(
        "identity_numeric", inputs, outputs=[grpcclient.InferRequestedOutput("OUT_FP32")]
    )
    np.testing.assert_array_equal(result.as_numpy("OUT_FP32"), x)


def test_inference_runs_off_the_event_loop(inprocess_server: ServerThread) -> None:
    """While a ~1 s execution runs, other RPCs (inference included) are answered."""
    server = inprocess_server
    slow = server.server.registry.resolve("slow", "")
    finished = threading.Event()

    def slow_call() -> None:
        with server.client() as own:
            own.infer("slow", [_input("x", np.full((1024, 512), 0.01, np.float32))])
        finished.set()

    caller = threading.Thread(target=slow_call)
    caller.start()
    deadline = time.monotonic() + 30
    while slow.stats.snapshot().in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert slow.stats.snapshot().in_flight == 1
    with server.client() as client:
        assert client.is_server_live()
        assert client.get_model_metadata("add_sub").name == "add_sub"
        x = np.ones((1, 16), np.float32)
        client.infer("add_sub", [_input("INPUT0", x), _input("INPUT1", x)])
    answered_while_busy = not finished.is_set()
    caller.join(60)
    assert finished.is_set()
    assert answered_while_busy, "other RPCs waited for the slow execution"


def _every_numeric_input(rows: int, seed: int) -> tuple[list[grpcclient.InferInput], dict]:  # type: ignore[type-arg]
    """One input per numeric type, each of its own width, together well over 64 KiB."""
    arrays = {
        name: _sample(name, (rows, 3000 + 17 * position), seed + position)
        for position, name in enumerate(NUMERIC)
    }
    inputs = [_input(f"IN_{name}", array, name) for name, array in arrays.items()]
    inputs.append(_input("IN_BF16", np.zeros((rows, 1), np.float32), "BF16"))
    return inputs, arrays


def test_large_requests_keep_every_raw_input_in_its_place(
    client: grpcclient.InferenceServerClient,
) -> None:
    """Large requests take the zero-copy path (service/grpc_api/wire.py): each raw entry
    must still reach its own input."""
    inputs, arrays = _every_numeric_input(rows=2, seed=10)
    result = client.infer(
        "identity_numeric",
        inputs,
        outputs=[grpcclient.InferRequestedOutput(f"OUT_{name}") for name in arrays],
    )
    for name, array in arrays.items():
        output = result.as_numpy(f"OUT_{name}")
        assert output.dtype == array.dtype
        np.testing.assert_array_equal(output, array)


def test_large_requests_on_a_stream(client: grpcclient.InferenceServerClient) -> None:
    results: queue.Queue = queue.Queue()  # type: ignore[type-arg]
    sent = {}
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for index in range(3):
            inputs, arrays = _every_numeric_input(rows=1 + index, seed=100 * index)
            sent[f"big-{index}"] = arrays
            client.async_stream_infer(
                "identity_numeric",
                inputs,
                request_id=f"big-{index}",
                outputs=[grpcclient.InferRequestedOutput(f"OUT_{name}") for name in arrays],
            )
        received = [results.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    assert all(error is None for _, error in received)
    for result, _ in received:
        for name, array in sent[result.get_response().id].items():
            np.testing.assert_array_equal(result.as_numpy(f"OUT_{name}"), array)


def test_large_bytes_request(client: grpcclient.InferenceServerClient) -> None:
    rng = np.random.default_rng(3)
    strings = np.array(
        [
            ["é✓abc"[int(first) % 5 :].encode() * int(size) for first, size in row]
            for row in rng.integers(0, 800, (3, 40, 2))
        ],
        dtype=np.object_,
    )
    result = client.infer("identity_bytes", [_input("IN_BYTES", strings, "BYTES")])
    assert result.as_numpy("OUT_BYTES").tolist() == strings.tolist()
