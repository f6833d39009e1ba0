"""Every client mistake gets its own status and a message naming the tensor and the fix.

Requests are built with tritonclient's generated messages so that each field can
be set wrong on purpose. After each mistake the model must not have executed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from tests.conftest import FrontendsServer, ServerThread


@pytest.fixture(scope="session")
def server(either_server: ServerThread | FrontendsServer) -> ServerThread | FrontendsServer:
    """Every test here runs against one process and against two front ends."""
    return either_server


Request = service_pb2.ModelInferRequest
ONES = np.ones((1, 16), dtype=np.float32).tobytes()


def add_sub_request(rows: int = 1, **fields: object) -> Request:
    request = Request(model_name="add_sub", **fields)
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[rows, 16])
        request.raw_input_contents.append(np.ones((rows, 16), np.float32).tobytes())
    return request


def bytes_request(payload: bytes, shape: list[int]) -> Request:
    request = Request(model_name="identity_bytes")
    request.inputs.add(name="IN_BYTES", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(payload)
    return request


def tied_request(width_a: int, width_b: int) -> Request:
    request = Request(model_name="tied_dims")
    for name, width in (("a", width_a), ("b", width_b)):
        request.inputs.add(name=name, datatype="FP32", shape=[1, width])
        request.raw_input_contents.append(np.ones((1, width), np.float32).tobytes())
    return request


def prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _mutate(change: Callable[[Request], None], rows: int = 1) -> Request:
    request = add_sub_request(rows)
    change(request)
    return request


def _set_typed(request: Request) -> None:
    request.inputs[0].contents.fp32_contents.extend([1.0] * 16)


def _typed_only(request: Request, field: str, values: list) -> None:  # type: ignore[type-arg]
    del request.raw_input_contents[:]
    for tensor in request.inputs:
        getattr(tensor.contents, field).extend(values)


CASES: list[tuple[str, Request, grpc.StatusCode, list[str]]] = [
    (
        "unknown model",
        Request(model_name="nope"),
        grpc.StatusCode.NOT_FOUND,
        ["unknown model 'nope'"],
    ),
    ("empty model name", Request(), grpc.StatusCode.INVALID_ARGUMENT, ["model name is empty"]),
    (
        "unknown version",
        add_sub_request(model_version="7"),
        grpc.StatusCode.NOT_FOUND,
        ["no version 7", "versions served: 1"],
    ),
    (
        "version not a number",
        add_sub_request(model_version="v1"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'v1' is not a positive integer"],
    ),
    (
        "version in other digits",
        add_sub_request(model_version="²"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'²' is not a positive integer"],
    ),
    (
        "version zero",
        add_sub_request(model_version="0"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'0' is not a positive integer"],
    ),
    (
        "tied dims disagree",
        tied_request(3, 4),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'b' has size 4 in dimension 1", "input 'a' has 3", "dimension 'n'"],
    ),
    (
        "model failed to load",
        Request(model_name="broken"),
        grpc.StatusCode.UNAVAILABLE,
        ["'broken'", "no ready version"],
    ),
    (
        "missing input",
        _mutate(lambda r: (r.inputs.pop(), r.raw_input_contents.pop())),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT1'", "does not contain"],
    ),
    (
        "unknown input",
        _mutate(
            lambda r: (
                r.inputs.add(name="EXTRA", datatype="FP32", shape=[1, 16]),
                r.raw_input_contents.append(ONES),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'EXTRA' is not an input", "INPUT0, INPUT1"],
    ),
    (
        "duplicate input",
        _mutate(
            lambda r: (
                r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16]),
                r.raw_input_contents.append(ONES),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT0' appears more than once"],
    ),
    (
        "nameless input",
        _mutate(lambda r: setattr(r.inputs[0], "name", "")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["position 0 has no name"],
    ),
    (
        "wrong datatype",
        _mutate(lambda r: setattr(r.inputs[1], "datatype", "FP64")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT1' has datatype FP64", "expects FP32"],
    ),
    (
        "unknown datatype",
        _mutate(lambda r: setattr(r.inputs[0], "datatype", "FLOAT")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT0'", "unknown datatype 'FLOAT'"],
    ),
    (
        "wrong rank",
        _mutate(lambda r: r.inputs[0].shape.append(1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT0' has shape [1, 16, 1]", "expects [-1, 16]"],
    ),
    (
        "wrong dimension",
        _mutate(lambda r: r.inputs[0].shape.__setitem__(1, 15)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT0' has shape [1, 15]", "dimension 1 must be 16"],
    ),
    (
        "negative dimension",
        _mutate(lambda r: r.inputs[0].shape.__setitem__(1, -16)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT0'", "must not be negative"],
    ),
    (
        "batch above max",
        add_sub_request(rows=9),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["batch size 9", "1 to 8 (max_batch_size)"],
    ),
    (
        "batch zero",
        _mutate(
            lambda r: (
                r.inputs[0].shape.__setitem__(0, 0),
                r.raw_input_contents.__setitem__(0, b""),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT0' has batch size 0"],
    ),
    (
        "inconsistent batch",
        _mutate(
            lambda r: (
                r.inputs[1].shape.__setitem__(0, 2),
                r.raw_input_contents.__setitem__(1, ONES * 2),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT1' has batch size 2", "'INPUT0' has 1"],
    ),
    (
        "raw too short",
        _mutate(lambda r: r.raw_input_contents.__setitem__(0, ONES[:-4])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT0'", "60 bytes", "needs 64 bytes"],
    ),
    (
        "raw too long",
        _mutate(lambda r: r.raw_input_contents.__setitem__(1, ONES + b"\0")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT1'", "65 bytes"],
    ),
    (
        "raw entry count",
        _mutate(lambda r: r.raw_input_contents.pop()),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["raw_input_contents has 1 entries", "2 inputs"],
    ),
    (
        "raw and typed",
        _mutate(_set_typed),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT0' has both raw_input_contents and typed contents"],
    ),
    (
        "typed wrong field",
        _mutate(lambda r: _typed_only(r, "int_contents", [1] * 16)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT0' is FP32", "contents.fp32_contents", "not contents.int_contents"],
    ),
    (
        "typed wrong count",
        _mutate(lambda r: _typed_only(r, "fp32_contents", [1.0] * 15)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT0' has 15 values", "needs 16"],
    ),
    (
        "no values at all",
        _mutate(lambda r: r.ClearField("raw_input_contents")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'INPUT0' has 0 values"],
    ),
    (
        "unknown requested output",
        _mutate(lambda r: r.outputs.add(name="OUTPUT9")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'OUTPUT9' is not an output", "OUTPUT0, OUTPUT1"],
    ),
    (
        "duplicate requested output",
        _mutate(lambda r: (r.outputs.add(name="OUTPUT0"), r.outputs.add(name="OUTPUT0"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'OUTPUT0' is requested more than once"],
    ),
    (
        "BYTES length prefix overruns",
        bytes_request(prefixed(b"ab")[:-1], [1, 1]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'IN_BYTES'", "element 0 declares 2 bytes but only 1 remain"],
    ),
    (
        "BYTES truncated prefix",
        bytes_request(prefixed(b"ab") + b"\x01\x00", [1, 2]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'IN_BYTES'", "ends before element 1 of 2"],
    ),
    (
        "BYTES too short for shape",
        bytes_request(prefixed(b"ab"), [1, 100]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'IN_BYTES'", "cannot hold 100 elements"],
    ),
    (
        "BYTES left over",
        bytes_request(prefixed(b"ab", b"c"), [1, 1]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'IN_BYTES'", "left over after 1 elements"],
    ),
    (
        "BYTES not UTF-8",
        bytes_request(prefixed(b"\xff\xfe"), [1, 1]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'IN_BYTES' element 0 is not valid UTF-8"],
    ),
    (
        "shared memory input",
        _mutate(
            lambda r: (
                r.inputs[0]
                .parameters["shared_memory_region"]
                .MergeFrom(service_pb2.InferParameter(string_param="region0"))
            )
        ),
        grpc.StatusCode.UNIMPLEMENTED,
        ["'INPUT0'", "shared memory"],
    ),
    (
        "classification output",
        _mutate(
            lambda r: (
                r.outputs.add(name="OUTPUT0")
                .parameters["classification"]
                .MergeFrom(service_pb2.InferParameter(int64_param=3))
            )
        ),
        grpc.StatusCode.UNIMPLEMENTED,
        ["'OUTPUT0'", "classification"],
    ),
    (
        "sequence parameter",
        _mutate(
            lambda r: r.parameters["sequence_id"].MergeFrom(
                service_pb2.InferParameter(int64_param=3)
            )
        ),
        grpc.StatusCode.UNIMPLEMENTED,
        ["'sequence_id'", "sequence batching"],
    ),
    (
        "negative priority",
        _mutate(
            lambda r: r.parameters["priority"].MergeFrom(service_pb2.InferParameter(int64_param=-1))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'priority' is -1", "non-negative integer"],
    ),
    (
        "string timeout",
        _mutate(
            lambda r: r.parameters["timeout"].MergeFrom(
                service_pb2.InferParameter(string_param="1s")
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'timeout' is '1s'"],
    ),
]


def _execution_count(stub: object, model: str) -> int:
    stats = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=model))  # type: ignore[attr-defined]
    return sum(s.execution_count for s in stats.model_stats)


@pytest.mark.parametrize(
    ("request_message", "code", "fragments"), [pytest.param(r, c, f, id=n) for n, r, c, f in CASES]
)
def test_client_mistake(
    stub: object, request_message: Request, code: grpc.StatusCode, fragments: list[str]
) -> None:
    watched = ("add_sub", "identity_bytes", "tied_dims")
    executed_before = sum(_execution_count(stub, model) for model in watched)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_message)  # type: ignore[attr-defined]
    error = caught.value
    assert error.code() == code, error.details()  # type: ignore[attr-defined]
    for fragment in fragments:
        assert fragment in error.details(), (fragment, error.details())  # type: ignore[attr-defined]
    executed_after = sum(_execution_count(stub, model) for model in watched)
    assert executed_after == executed_before, "a rejected request reached onnxruntime"
    # The server is still healthy and answers correctly.
    response = stub.ModelInfer(add_sub_request())  # type: ignore[attr-defined]
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[0], "<f4"), np.full(16, 2, np.float32)
    )


def test_typed_values_out_of_range(stub: object) -> None:
    request = Request(model_name="identity_typed")
    for name, field in (
        ("BOOL", "bool_contents"),
        ("INT8", "int_contents"),
        ("INT16", "int_contents"),
        ("INT32", "int_contents"),
        ("INT64", "int64_contents"),
        ("UINT8", "uint_contents"),
        ("UINT16", "uint_contents"),
        ("UINT32", "uint_contents"),
        ("UINT64", "uint64_contents"),
        ("FP32", "fp32_contents"),
        ("FP64", "fp64_contents"),
        ("BYTES", "bytes_contents"),
    ):
        tensor = request.inputs.add(name=f"IN_{name}", datatype=name, shape=[1, 1])
        getattr(tensor.contents, field).append(
            b"" if name == "BYTES" else (300 if name == "UINT8" else 0)
        )
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)  # type: ignore[attr-defined]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "'IN_UINT8' has values outside the UINT8 range [0, 255]" in caught.value.details()  # type: ignore[attr-defined]


def test_fp16_has_no_typed_field(stub: object) -> None:
    request = Request(model_name="identity_numeric")
    tensor = request.inputs.add(name="IN_FP16", datatype="FP16", shape=[1, 1])
    tensor.contents.fp32_contents.append(1.0)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)  # type: ignore[attr-defined]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "FP16, which has no typed contents field" in caught.value.details()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("rpc", "message"),
    [
        ("CudaSharedMemoryRegister", service_pb2.CudaSharedMemoryRegisterRequest()),
        ("TraceSetting", service_pb2.TraceSettingRequest()),
    ],
)
def test_unimplemented_rpcs_say_so(stub: object, rpc: str, message: object) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, rpc)(message)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    assert f"{rpc} is not supported" in caught.value.details()  # type: ignore[attr-defined]


def test_failures_are_counted_per_model(stub: object) -> None:
    def failures() -> int:
        stats = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="add_sub"))  # type: ignore[attr-defined]
        return stats.model_stats[0].inference_stats.fail.count

    before = failures()
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(add_sub_request(rows=9))  # type: ignore[attr-defined]
    assert failures() == before + 1


def test_message_size_limit_is_configurable(standard_repository: object) -> None:
    from tests.conftest import serve

    with serve(standard_repository, max_message_bytes=64 * 1024) as small:  # type: ignore[arg-type]
        channel = grpc.insecure_channel(small.url)
        from tritonclient.grpc import service_pb2_grpc

        limited = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = Request(model_name="identity_bytes")
        request.inputs.add(name="IN_BYTES", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(prefixed(b"x" * 100_000))
        with pytest.raises(grpc.RpcError) as caught:
            limited.ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        channel.close()


def test_server_keeps_serving_after_all_mistakes(server: ServerThread) -> None:
    with server.client() as client:
        assert client.is_server_ready()
        assert client.is_model_ready("add_sub")


def test_execution_count_includes_runs_that_fail_in_onnxruntime(stub: object) -> None:
    """What makes the 'never reached onnxruntime' checks above able to fail.

    `fragile` reshapes [batch, n] to [batch, 3] inside the graph, so n = 4 passes
    validation (n is free in the config) and fails in onnxruntime: the run counts.
    """
    request = Request(model_name="fragile")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    before = _execution_count(stub, "fragile")
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)  # type: ignore[attr-defined]
    assert caught.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    details = caught.value.details()  # type: ignore[attr-defined]
    assert "onnxruntime failed to execute the model" in details
    assert "onnxruntime_src" not in details and ".cc:" not in details
    assert _execution_count(stub, "fragile") == before + 1


@pytest.mark.parametrize(
    ("method", "body", "reason"),
    [
        ("ModelInfer", b"\xff" * 10, "Wire format was corrupt"),
        ("ModelInfer", b"\x3a\x80\x80\x08" + bytes(70_000), "Wire format was corrupt"),
        ("ModelInfer", b"\x0a\x02\xff\xfe" + b"\x3a\x80\x80\x04" + bytes(65_536), "bad UTF-8"),
        ("ModelMetadata", b"\x0a\x02\xff\xfe", "bad UTF-8"),
    ],
    ids=["small", "large-truncated", "large-bad-name", "metadata"],
)
def test_bodies_that_are_not_protobuf_are_invalid_arguments(
    server: ServerThread, method: str, body: bytes, reason: str
) -> None:
    """gRPC Python would answer UNKNOWN with a Python class name; the client's bytes are wrong."""
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as caught:
            call(body, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    details = caught.value.details()  # type: ignore[attr-defined]
    assert details.startswith(f"the request is not a valid inference.{method}Request message: ")
    assert reason in details and "class" not in details


def test_a_malformed_message_on_a_stream_is_answered_and_the_stream_goes_on(
    server: ServerThread,
) -> None:
    good = Request(model_name="add_sub", id="after")
    for name in ("INPUT0", "INPUT1"):
        good.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        good.raw_input_contents.append(np.ones(16, np.float32).tobytes())
    with grpc.insecure_channel(server.url) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        replies = [
            service_pb2.ModelStreamInferResponse.FromString(raw)
            for raw in call(iter([b"\xff" * 10, good.SerializeToString()]), timeout=30)
        ]
    errors = [reply.error_message for reply in replies if reply.error_message]
    assert errors == [
        "the request is not a valid inference.ModelInferRequest message: Wire format was corrupt"
    ]
    answered = [reply.infer_response for reply in replies if not reply.error_message]
    assert [response.id for response in answered] == ["after"]
    np.testing.assert_array_equal(
        np.frombuffer(answered[0].raw_output_contents[0], np.float32), np.full(16, 2.0)
    )
