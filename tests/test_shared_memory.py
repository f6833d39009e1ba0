"""Triton's system shared-memory extension, through tritonclient's own helpers.

Regions are made with tritonclient.utils.shared_memory (POSIX objects in
/dev/shm, as a user's client makes them); every request goes through a real
server with --allow-shared-memory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from tests.conftest import ServerThread, http_client, serve

PREFIX = f"bwtest{os.getpid()}"


@pytest.fixture(scope="module")
def shm_server(standard_repository: Path) -> Iterator[ServerThread]:
    with serve(standard_repository, allow_shared_memory=True) as running:
        yield running


@pytest.fixture()
def client(shm_server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with shm_server.client() as connection:
        yield connection
        connection.unregister_system_shared_memory()


@pytest.fixture()
def stub(shm_server: ServerThread) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(shm_server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@contextmanager
def region(name: str, byte_size: int) -> Iterator[object]:
    """A client-owned shared memory object, removed afterwards."""
    handle = shm.create_shared_memory_region(name, f"/{PREFIX}_{name}", byte_size)
    try:
        yield handle
    finally:
        shm.destroy_shared_memory_region(handle)


def key(name: str) -> str:
    return f"/{PREFIX}_{name}"


def rows(count: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(count * 16, dtype=np.float32) + start).reshape(count, 16)


def test_inputs_and_outputs_in_shared_memory(client: grpcclient.InferenceServerClient) -> None:
    a, b = rows(3), rows(3, 100.0)
    size = a.nbytes
    with region("in", 2 * size) as inputs, region("out", 2 * size) as outputs:
        shm.set_shared_memory_region(inputs, [a, b])
        client.register_system_shared_memory("in", key("in"), 2 * size)
        client.register_system_shared_memory("out", key("out"), 2 * size)
        in0 = grpcclient.InferInput("INPUT0", [3, 16], "FP32")
        in0.set_shared_memory("in", size)
        in1 = grpcclient.InferInput("INPUT1", [3, 16], "FP32")
        in1.set_shared_memory("in", size, offset=size)
        out0 = grpcclient.InferRequestedOutput("OUTPUT0")
        out0.set_shared_memory("out", size)
        out1 = grpcclient.InferRequestedOutput("OUTPUT1")
        out1.set_shared_memory("out", size, offset=size)
        result = client.infer("add_sub", [in0, in1], outputs=[out0, out1])
        response = result.get_response()
        assert not any(response.raw_output_contents)  # nothing came through gRPC
        sent = result.get_output("OUTPUT1")
        assert sent.parameters["shared_memory_region"].string_param == "out"
        assert sent.parameters["shared_memory_offset"].int64_param == size
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(outputs, np.float32, [3, 16]), a + b
        )
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(outputs, np.float32, [3, 16], offset=size), a - b
        )


def test_mixed_inline_and_shared(client: grpcclient.InferenceServerClient) -> None:
    """One input and one output in a region, the others in the message: raw entries follow
    the inline tensors, and each output's raw entry stays at its position."""
    a, b = rows(1), rows(1, 7.0)
    with region("mixed_in", a.nbytes) as inputs, region("mixed_out", a.nbytes) as outputs:
        shm.set_shared_memory_region(inputs, [b])
        client.register_system_shared_memory("mixed_in", key("mixed_in"), a.nbytes)
        client.register_system_shared_memory("mixed_out", key("mixed_out"), a.nbytes)
        in0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        in0.set_data_from_numpy(a)
        in1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32")
        in1.set_shared_memory("mixed_in", a.nbytes)
        out0 = grpcclient.InferRequestedOutput("OUTPUT0")
        out0.set_shared_memory("mixed_out", a.nbytes)
        out1 = grpcclient.InferRequestedOutput("OUTPUT1")
        result = client.infer("add_sub", [in1, in0], outputs=[out0, out1])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(outputs, np.float32, [1, 16]), a + b
        )


def test_registration_offset_is_added(client: grpcclient.InferenceServerClient) -> None:
    """A region registered at an offset into its object: request offsets count from there."""
    a, b = rows(1, 1.0), rows(1, 2.0)
    head = 4096
    with region("offset", head + 2 * a.nbytes) as memory:
        shm.set_shared_memory_region(memory, [a, b], offset=head)
        client.register_system_shared_memory("offset", key("offset"), 2 * a.nbytes, offset=head)
        status = client.get_system_shared_memory_status("offset")
        assert status.regions["offset"].offset == head
        in0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        in0.set_shared_memory("offset", a.nbytes)
        in1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32")
        in1.set_shared_memory("offset", a.nbytes, offset=a.nbytes)
        result = client.infer("add_sub", [in0, in1])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def test_concurrent_requests_each_get_their_own_answer(shm_server: ServerThread) -> None:
    """Requests from many clients batch together; each reads and writes only its windows."""
    clients = 8
    size = rows(1).nbytes
    failures: list[str] = []
    with region("many_in", clients * 2 * size) as inputs, region("many_out", clients * size):
        with shm_server.client() as admin:
            admin.register_system_shared_memory("many_in", key("many_in"), clients * 2 * size)
            admin.register_system_shared_memory("many_out", key("many_out"), clients * size)
        for index in range(clients):
            shm.set_shared_memory_region(
                inputs, [rows(1, index * 10.0), rows(1, index)], offset=index * 2 * size
            )

        def one_client(index: int) -> None:
            with shm_server.client() as connection:
                for _ in range(20):
                    in0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
                    in0.set_shared_memory("many_in", size, offset=index * 2 * size)
                    in1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32")
                    in1.set_shared_memory("many_in", size, offset=index * 2 * size + size)
                    out = grpcclient.InferRequestedOutput("OUTPUT0")
                    out.set_shared_memory("many_out", size, offset=index * size)
                    connection.infer("add_sub", [in0, in1], outputs=[out])
                    answer = np.frombuffer(
                        Path(f"/dev/shm/{PREFIX}_many_out").read_bytes()[
                            index * size : (index + 1) * size
                        ],
                        dtype=np.float32,
                    )
                    expected = (rows(1, index * 10.0) + rows(1, index)).reshape(-1)
                    if not np.array_equal(answer, expected):
                        failures.append(f"client {index} read {answer[:3]}")

        threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with shm_server.client() as admin:
            admin.unregister_system_shared_memory()
    assert not failures, failures[:5]


def test_bytes_tensors_in_shared_memory(client: grpcclient.InferenceServerClient) -> None:
    strings = np.array([["alpha", "", "naïve ünïcode"]], dtype=object)
    serialized = serialize_byte_tensor(strings)
    payload = serialized.item()
    with region("bytes_in", len(payload)) as inputs, region("bytes_out", 256) as outputs:
        shm.set_shared_memory_region(inputs, [serialized])
        client.register_system_shared_memory("bytes_in", key("bytes_in"), len(payload))
        client.register_system_shared_memory("bytes_out", key("bytes_out"), 256)
        tensor = grpcclient.InferInput("IN_BYTES", [1, 3], "BYTES")
        tensor.set_shared_memory("bytes_in", len(payload))
        out = grpcclient.InferRequestedOutput("OUT_BYTES")
        out.set_shared_memory("bytes_out", 256)
        result = client.infer("identity_bytes", [tensor], outputs=[out])
        written = result.get_output("OUT_BYTES").parameters["shared_memory_byte_size"].int64_param
        assert written == len(payload)
        got = shm.get_contents_as_numpy(outputs, np.object_, [1, 3])
        assert got.tolist() == [[text.encode() for text in strings[0]]]


def test_streaming_infer_with_shared_memory(client: grpcclient.InferenceServerClient) -> None:
    a = rows(1, 3.0)
    answers: list[object] = []
    with region("stream", 2 * a.nbytes) as memory:
        shm.set_shared_memory_region(memory, [a, a])
        client.register_system_shared_memory("stream", key("stream"), 2 * a.nbytes)
        client.start_stream(callback=lambda result, error: answers.append(error or result))
        in0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        in0.set_shared_memory("stream", a.nbytes)
        in1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32")
        in1.set_shared_memory("stream", a.nbytes, offset=a.nbytes)
        client.async_stream_infer("add_sub", [in0, in1])
        client.stop_stream()
    assert len(answers) == 1 and not isinstance(answers[0], Exception), answers
    np.testing.assert_array_equal(answers[0].as_numpy("OUTPUT0"), a + a)  # type: ignore[attr-defined]


def test_status_and_unregister(client: grpcclient.InferenceServerClient) -> None:
    with region("s1", 64), region("s2", 128):
        client.register_system_shared_memory("s1", key("s1"), 64)
        client.register_system_shared_memory("s2", key("s2"), 100, offset=16)
        status = client.get_system_shared_memory_status()
        assert set(status.regions) == {"s1", "s2"}
        second = status.regions["s2"]
        assert (second.name, second.key, second.offset, second.byte_size) == (
            "s2",
            key("s2"),
            16,
            100,
        )
        client.unregister_system_shared_memory("s1")
        assert set(client.get_system_shared_memory_status().regions) == {"s2"}
        client.unregister_system_shared_memory("never-registered")  # clean-up always succeeds
        with pytest.raises(InferenceServerException) as missing:
            client.get_system_shared_memory_status("s1")
        assert missing.value.status() == "StatusCode.NOT_FOUND"
        assert "s1" in missing.value.message()
        client.unregister_system_shared_memory()
        assert not client.get_system_shared_memory_status().regions


def test_a_request_after_unregister_is_refused(client: grpcclient.InferenceServerClient) -> None:
    a = rows(1)
    with region("gone", 2 * a.nbytes):
        client.register_system_shared_memory("gone", key("gone"), 2 * a.nbytes)
        client.unregister_system_shared_memory("gone")
        in0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        in0.set_shared_memory("gone", a.nbytes)
        in1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32")
        in1.set_data_from_numpy(a)
        with pytest.raises(InferenceServerException) as refused:
            client.infer("add_sub", [in0, in1])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'INPUT0'" in refused.value.message()
    assert "'gone', which is not registered" in refused.value.message()


def _register_error(client: grpcclient.InferenceServerClient, *args: object, **kw: object) -> str:
    with pytest.raises(InferenceServerException) as refused:
        client.register_system_shared_memory(*args, **kw)
    message = refused.value.message()
    assert "/dev/shm" not in message
    return f"{refused.value.status()} {message}"


def test_registration_is_checked(client: grpcclient.InferenceServerClient, tmp_path: Path) -> None:
    with region("reg", 256):
        client.register_system_shared_memory("reg", key("reg"), 256)
        duplicate = _register_error(client, "reg", key("reg"), 256)
        assert "ALREADY_EXISTS" in duplicate and "'reg' is already registered" in duplicate
        too_big = _register_error(client, "big", key("reg"), 200, offset=100)
        assert "INVALID_ARGUMENT" in too_big and "past the end" in too_big
        assert key("reg") not in too_big
        empty = _register_error(client, "empty", key("reg"), 0)
        assert "byte_size must be at least 1" in empty
    absent = _register_error(client, "absent", f"/{PREFIX}_no_such_key", 64)
    assert "INVALID_ARGUMENT" in absent and "no shared memory object has that key" in absent
    assert f"{PREFIX}_no_such_key" not in absent
    for bad in ("/a/b", "../etc/passwd", "/", ""):
        message = _register_error(client, "bad", bad, 64)
        assert "INVALID_ARGUMENT" in message, message
        assert bad.strip("/") == "" or bad not in message
    reserved = _register_error(client, "mine", "/batchwise_slab_0", 64)
    assert "reserved" in reserved
    link = Path(f"/dev/shm/{PREFIX}_link")
    target = tmp_path / "target"
    target.write_bytes(bytes(64))
    link.symlink_to(target)
    try:
        linked = _register_error(client, "link", f"/{PREFIX}_link", 64)
    finally:
        link.unlink()
    assert "link" in linked and "INVALID_ARGUMENT" in linked
    assert set(client.get_system_shared_memory_status().regions) == {"reg"}  # none of the refused


def _infer_error(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, request: service_pb2.ModelInferRequest
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request)
    return refused.value


def _add_sub_request(
    in0: dict[str, object], out0: dict[str, object] | None = None
) -> service_pb2.ModelInferRequest:
    """INPUT0 placed by `in0`'s parameters, INPUT1 inline."""
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    first = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    for name, value in in0.items():
        if isinstance(value, str):
            first.parameters[name].string_param = value
        else:
            first.parameters[name].int64_param = int(value)  # type: ignore[call-overload]
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(rows(1).tobytes())
    if out0 is not None:
        output = request.outputs.add(name="OUTPUT0")
        for name, value in out0.items():
            if isinstance(value, str):
                output.parameters[name].string_param = value
            else:
                output.parameters[name].int64_param = int(value)  # type: ignore[call-overload]
    return request


def test_tensor_windows_are_checked(
    client: grpcclient.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    size = rows(1).nbytes
    with region("win", 2 * size):
        client.register_system_shared_memory("win", key("win"), 2 * size)
        region_only = {"shared_memory_region": "win"}
        cases = {
            "past the end": {
                **region_only,
                "shared_memory_byte_size": size,
                "shared_memory_offset": size + 4,
            },
            # offset + size wraps a 64-bit integer: still past the end, never a crash.
            "past the end ": {
                **region_only,
                "shared_memory_byte_size": size,
                "shared_memory_offset": 2**63 - 1,
            },
            "expected a non-negative integer": {
                **region_only,
                "shared_memory_byte_size": size,
                "shared_memory_offset": -8,
            },
            "needs 64 bytes": {**region_only, "shared_memory_byte_size": 32},
            "no 'shared_memory_byte_size'": region_only,
            "no 'shared_memory_region'": {"shared_memory_byte_size": size},
        }
        for expected, parameters in cases.items():
            error = _infer_error(stub, _add_sub_request(parameters))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (expected, error.details())
            assert "input 'INPUT0'" in error.details() and expected.strip() in error.details(), (
                expected,
                error.details(),
            )
        # The raw entries count only the inline inputs.
        request = _add_sub_request({**region_only, "shared_memory_byte_size": size})
        request.raw_input_contents.append(rows(1).tobytes())
        error = _infer_error(stub, request)
        assert (
            "raw_input_contents has 2 entries but the request has 1 inputs not in shared memory"
            in error.details()
        )
        # An output window too small for the result.
        fine = {**region_only, "shared_memory_byte_size": size}
        small = {**region_only, "shared_memory_byte_size": 16, "shared_memory_offset": size}
        error = _infer_error(stub, _add_sub_request(fine, small))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            "output 'OUTPUT0' has 64 bytes, more than its shared_memory_byte_size 16"
            in error.details()
        )
        stub.ModelInfer(_add_sub_request(fine, {**small, "shared_memory_byte_size": size}))


def test_a_shrunk_object_is_refused_not_a_crash(client: grpcclient.InferenceServerClient) -> None:
    """A client that truncates its object after registering: SIGBUS would kill the server
    if it touched the missing pages."""
    a = rows(1)
    with region("shrink", 2 * a.nbytes):
        client.register_system_shared_memory("shrink", key("shrink"), 2 * a.nbytes)
        os.truncate(f"/dev/shm/{PREFIX}_shrink", 0)
        in0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        in0.set_shared_memory("shrink", a.nbytes)
        in1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32")
        in1.set_data_from_numpy(a)
        with pytest.raises(InferenceServerException) as refused:
            client.infer("add_sub", [in0, in1])
        assert "has shrunk since it was registered" in refused.value.message()
        assert client.is_server_live()


def test_off_by_default(server: ServerThread) -> None:
    with server.client() as connection:
        assert "system_shared_memory" not in connection.get_server_metadata().extensions
        with pytest.raises(InferenceServerException) as refused:
            connection.register_system_shared_memory("r", "/anything", 64)
        assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
        assert "--allow-shared-memory" in refused.value.message()
        for call in (
            connection.get_system_shared_memory_status,
            connection.unregister_system_shared_memory,
        ):
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
        in0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        in0.set_shared_memory("r", 64)
        in1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32")
        in1.set_data_from_numpy(rows(1))
        with pytest.raises(InferenceServerException) as refused:
            connection.infer("add_sub", [in0, in1])
        assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
        assert "input 'INPUT0' names a shared memory region" in refused.value.message()
        assert "--allow-shared-memory" in refused.value.message()


def test_listed_in_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert "system_shared_memory" in client.get_server_metadata().extensions
    assert "cuda_shared_memory" not in client.get_server_metadata().extensions


def test_cuda_regions_none_but_clean_up_succeeds(client: grpcclient.InferenceServerClient) -> None:
    """No CUDA region can be registered here; listing and clearing them still work, as
    clients that used system shared memory clean up both kinds."""
    assert not client.get_cuda_shared_memory_status().regions
    client.unregister_cuda_shared_memory()
    with pytest.raises(InferenceServerException) as refused:
        client.register_cuda_shared_memory("gpu", b"\0" * 64, 0, 1024)
    assert refused.value.status() == "StatusCode.UNIMPLEMENTED"


def test_over_http(shm_server: ServerThread) -> None:
    """The same extension through tritonclient.http: register, mixed inline and shared
    inputs, an output written to a region, status, errors, unregister."""
    a, b = rows(2), rows(2, 7.0)
    size = a.nbytes
    with (
        http_client(shm_server.http_url) as client,
        region("hin", size) as inputs,
        region("hout", size) as outputs,
    ):
        shm.set_shared_memory_region(inputs, [a])
        client.register_system_shared_memory("hin", key("hin"), size)
        client.register_system_shared_memory("hout", key("hout"), size)
        status = {entry["name"]: entry for entry in client.get_system_shared_memory_status()}
        assert status["hin"] == {"name": "hin", "key": key("hin"), "offset": 0, "byte_size": size}
        with pytest.raises(InferenceServerException) as taken:
            client.register_system_shared_memory("hin", key("hin"), size)
        assert taken.value.status() == "400" and "already" in taken.value.message()
        in0 = httpclient.InferInput("INPUT0", [2, 16], "FP32")
        in0.set_shared_memory("hin", size)
        in1 = httpclient.InferInput("INPUT1", [2, 16], "FP32")
        in1.set_data_from_numpy(b)
        out0 = httpclient.InferRequestedOutput("OUTPUT0")
        out0.set_shared_memory("hout", size)
        out1 = httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)
        result = client.infer("add_sub", [in0, in1], outputs=[out0, out1])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        written = shm.get_contents_as_numpy(outputs, np.float32, [2, 16])
        np.testing.assert_array_equal(written, a + b)
        in0.set_shared_memory("hin", size, offset=8)
        with pytest.raises(InferenceServerException) as outside:
            client.infer("add_sub", [in0, in1])
        assert outside.value.status() == "400" and "INPUT0" in outside.value.message()
        client.unregister_system_shared_memory("hin")
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
