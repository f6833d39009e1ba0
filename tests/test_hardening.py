"""Bounded resources, overload, SIGTERM under load and fatal runtime errors."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from tests import onnx_models as models
from tests.conftest import ServerThread, serve
from tests.process import ROOT, start_on_loopback

QUEUE = 8
BATCH = 4
BURST = 200
PENDING_BURST = 600
SLEEPY_STEPS = 20000
# What gRPC answers, by itself, for a call that reaches a server in the instant it stops.
NOT_ADMITTED = "StatusCode.CANCELLED: CANCELLED"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    models.save(models.identity(["BYTES", "FP32"]), root, "identity")
    models.save(
        models.sleepy_double(),
        root,
        "sleepy",
        config=(
            f"max_batch_size: {BATCH}\n"
            f"dynamic_batching {{ default_queue_policy {{ max_queue_size: {QUEUE} }} }}\n"
            'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
        ),
    )
    return root


def _sleepy(value: float = 1.0, steps: int = SLEEPY_STEPS) -> list[grpcclient.InferInput]:
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.full((1, 4), value, np.float32))
    s = grpcclient.InferInput("steps", [1, 1], "INT64")
    s.set_data_from_numpy(np.full((1, 1), steps, np.int64))
    return [x, s]


# ------------------------------------------------------------- limits ---


@pytest.fixture(scope="module")
def limited(repository: Path) -> Iterator[ServerThread]:
    with serve(repository, max_request_elements=1000, max_requests_in_flight=2) as server:
        yield server


def _executions(server: ServerThread, model: str) -> int:
    return int(server.server.registry.resolve(model, "").stats.snapshot().execution_count)


def test_requests_above_the_element_limit_are_refused_before_decoding(
    limited: ServerThread,
) -> None:
    executions = _executions(limited, "identity")
    request = service_pb2.ModelInferRequest(model_name="identity")
    # 2,000 empty strings cost 8 kB on the wire but ~80 kB of Python objects decoded.
    request.inputs.add(name="IN_BYTES", datatype="BYTES", shape=[1, 2000])
    request.raw_input_contents.append(b"\0\0\0\0" * 2000)
    request.inputs.add(name="IN_FP32", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(np.zeros(1, np.float32).tobytes())
    huge = service_pb2.ModelInferRequest(model_name="identity")
    huge.inputs.add(name="IN_BYTES", datatype="BYTES", shape=[1, 1])
    huge.raw_input_contents.append(b"\0\0\0\0")
    huge.inputs.add(name="IN_FP32", datatype="FP32", shape=[1, 2**62])
    huge.raw_input_contents.append(b"")
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(limited.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for message, fragment in (
            (request, "input 'IN_BYTES' has shape [1, 2000] (2000 elements)"),
            (huge, "brings the request to 4611686018427387905 elements"),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(message)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            details = refused.value.details()  # type: ignore[attr-defined]
            assert fragment in details and "--max-request-elements" in details
    assert _executions(limited, "identity") == executions
    # Below the limit the same model serves as usual.
    with limited.client() as client:
        text = grpcclient.InferInput("IN_BYTES", [1, 3], "BYTES")
        text.set_data_from_numpy(np.array([[b"a", b"b", b"c"]], dtype=object))
        number = grpcclient.InferInput("IN_FP32", [1, 1], "FP32")
        number.set_data_from_numpy(np.ones((1, 1), np.float32))
        result = client.infer("identity", [text, number])
        assert result.as_numpy("OUT_BYTES").tolist() == [[b"a", b"b", b"c"]]


def test_shapes_whose_product_overflows_int64_are_refused(repository: Path) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    with serve(repository, max_request_elements=0) as unlimited:
        request = service_pb2.ModelInferRequest(model_name="identity")
        request.inputs.add(name="IN_BYTES", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(b"\0\0\0\0")
        request.inputs.add(name="IN_FP32", datatype="FP32", shape=[1, 2**62])
        request.raw_input_contents.append(b"\0" * 8)
        with grpc.insecure_channel(unlimited.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "[1, 4611686018427387904]" in refused.value.details()  # type: ignore[attr-defined]


def test_requests_beyond_the_in_flight_limit_are_refused_at_once(limited: ServerThread) -> None:
    with ThreadPoolExecutor(4) as pool:

        def slow() -> object:
            with limited.client() as client:
                return client.infer("sleepy", _sleepy(steps=200_000))

        held = [pool.submit(slow) for _ in range(2)]
        deadline = time.monotonic() + 30
        while limited.server.state.in_flight < 2:
            assert time.monotonic() < deadline, "the slow requests never started"
            time.sleep(0.005)
        with limited.client() as client, pytest.raises(InferenceServerException) as refused:
            client.infer("sleepy", _sleepy(steps=0))
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert "limit of 2 requests in flight" in refused.value.message()
        # Answered while both slow ones were still running.
        assert not any(future.done() for future in held)
        for future in held:
            future.result(120)


# ----------------------------------------------------------- overload ---


def _queue_depth(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    found = re.findall(r'^batchwise_queue_depth\{model="sleepy",version="1"\} (\S+)$', text, re.M)
    return float(found[0]) if found else 0.0


def test_overload_is_rejected_with_unavailable_and_the_queue_stays_bounded(
    repository: Path,
) -> None:
    with serve(repository) as server:
        outcomes: list[str] = []
        lock = threading.Lock()
        finished = threading.Event()

        def done(result: object, error: InferenceServerException | None) -> None:
            with lock:
                if error is None:
                    outcomes.append("OK")
                else:
                    outcomes.append(f"{error.status()}: {error.message()}")
                if len(outcomes) == BURST:
                    finished.set()

        depths: list[float] = []
        with server.client() as client:
            for index in range(BURST):
                client.async_infer("sleepy", _sleepy(float(index)), done)
            while not finished.wait(0.02):
                depths.append(_queue_depth(server.server.metrics_port))
        counts = Counter("OK" if outcome == "OK" else outcome.split(":")[0] for outcome in outcomes)
        rejected = [outcome for outcome in outcomes if outcome != "OK"]
        assert set(counts) == {"OK", "StatusCode.UNAVAILABLE"}, counts
        assert all("Exceeds maximum queue size" in outcome for outcome in rejected)
        assert counts["StatusCode.UNAVAILABLE"] > BURST // 2, counts
        # Never more waiting than the queue policy allows; so an admitted request waits for
        # at most QUEUE / BATCH batches ahead of it, whatever the offered load.
        assert max(depths, default=0) <= QUEUE
        snapshot = server.server.registry.resolve("sleepy", "").stats.snapshot()
        assert snapshot.success.count == counts["OK"]
        assert snapshot.fail.count == counts["StatusCode.UNAVAILABLE"]
        # Still serving normally afterwards.
        with server.client() as client:
            result = client.infer("sleepy", _sleepy(3.0, steps=0))
            np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 6.0))


def _identity_inputs(value: float) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("IN_BYTES", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[str(value).encode()]], dtype=object))
    number = grpcclient.InferInput("IN_FP32", [1, 1], "FP32")
    number.set_data_from_numpy(np.full((1, 1), value, np.float32))
    return [text, number]


def _burst(server: ServerThread, calls: int) -> Counter[str]:
    """`calls` identity requests at once; each answer checked against its own request."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    finished = threading.Event()

    def on_answer(index: int) -> object:
        def done(result: object, error: InferenceServerException | None) -> None:
            if error is None:
                assert isinstance(result, grpcclient.InferResult)
                number = result.as_numpy("OUT_FP32")
                text = result.as_numpy("OUT_BYTES")
                correct = number is not None and number.tolist() == [[float(index)]]
                correct = correct and text is not None and text[0, 0] == str(float(index)).encode()
                outcome = "OK" if correct else "WRONG ANSWER"
            else:
                outcome = f"{error.status()}: {error.message()}"
            with lock:
                outcomes[outcome] += 1
                if sum(outcomes.values()) == calls:
                    finished.set()

        return done

    with server.client() as client:
        for index in range(calls):
            client.async_infer("identity", _identity_inputs(float(index)), on_answer(index))
        assert finished.wait(120), "some calls were never answered"
    return outcomes


def test_calls_beyond_grpcs_pending_bound_are_turned_away_at_once(repository: Path) -> None:
    """When the event loop, not the model, is the bottleneck, the wait is in gRPC's own queue.

    A burst of cheap requests arrives faster than the server takes calls from gRPC;
    what waits beyond --grpc-max-pending-calls is turned away by gRPC at once (with
    CANCELLED, before the server sees it). With a bound larger than the burst,
    the same burst is served whole, so the refusals come from the setting.
    """
    with serve(repository, grpc_max_pending_calls=2) as server:
        outcomes = _burst(server, PENDING_BURST)
        assert set(outcomes) <= {"OK", NOT_ADMITTED}, outcomes
        assert outcomes[NOT_ADMITTED] > 0 and outcomes["OK"] > 0, outcomes
        # Those turned away never reached a model.
        snapshot = server.server.registry.resolve("identity", "").stats.snapshot()
        assert snapshot.success.count == outcomes["OK"] and snapshot.fail.count == 0
        # Serving as usual afterwards.
        assert _burst(server, 1) == Counter({"OK": 1})
    with serve(repository, grpc_max_pending_calls=10 * PENDING_BURST) as server:
        assert _burst(server, PENDING_BURST) == Counter({"OK": PENDING_BURST})


# ----------------------------------------------------- SIGTERM, crash ---


def test_sigterm_under_load_fails_no_admitted_request(repository: Path) -> None:
    server = start_on_loopback(repository, "--access-log")
    port = server.grpc_port()
    outcomes: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def send(worker: int) -> None:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
            sequence = 0
            while not stop.is_set():
                value = float(worker * 1000 + sequence)
                try:
                    result = client.infer("sleepy", _sleepy(value, steps=300))
                    expected = np.full((1, 4), 2 * value, np.float32)
                    outcome = "OK" if np.array_equal(result.as_numpy("y"), expected) else "WRONG"
                except InferenceServerException as error:
                    outcome = f"{error.status()}: {error.message()}"
                with lock:
                    outcomes.append(outcome)
                if outcome != "OK":
                    return  # refused: the server is going away
                sequence += 1

    try:
        workers = [threading.Thread(target=send, args=(worker,)) for worker in range(8)]
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        server.process.send_signal(signal.SIGTERM)
        assert server.wait_exit(timeout=60) == 0
        stop.set()
        for worker in workers:
            worker.join(30)
    finally:
        server.kill()
    succeeded = outcomes.count("OK")
    refused = [outcome for outcome in outcomes if outcome != "OK"]
    assert succeeded > 0 and "WRONG" not in outcomes
    # Refused with UNAVAILABLE (retryable), never CANCELLED: the server closes only once
    # no request has arrived for a moment, so gRPC holds no call it has not handed over.
    assert all(outcome.startswith("StatusCode.UNAVAILABLE") for outcome in refused), refused
    # Every request the server admitted ended OK: the access log has no other code than
    # OK and the refusals, and the clients received every OK it logged.
    codes = Counter(re.findall(r"model=sleepy version=- code=(\w+)", server.log))
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["OK"] == succeeded
    assert "shutting down:" in server.log and "server stopped" in server.log


def test_fatal_runtime_error_makes_the_process_exit_non_zero(repository: Path) -> None:
    fault_folder = str(ROOT / "tests" / "faults")
    environment = {
        "BATCHWISE_TEST_FAULT": "cuda",
        "PYTHONPATH": os.pathsep.join([fault_folder, str(ROOT)]),
    }
    server = start_on_loopback(repository, env=environment)
    try:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port()}") as client:
            healthy = client.infer("sleepy", _sleepy(1.0, steps=0))
            np.testing.assert_array_equal(healthy.as_numpy("y"), np.full((1, 4), 2.0))
            with pytest.raises(InferenceServerException) as failed:
                client.infer("sleepy", _sleepy(13.0, steps=0))
        assert failed.value.status() == "StatusCode.UNAVAILABLE"
        assert "fatal runtime error" in failed.value.message()
        assert "illegal memory access" not in failed.value.message()
        assert server.wait_exit(timeout=60) == 3
    finally:
        server.kill()
    assert "fatal runtime error, the server will exit: onnxruntime:" in server.log
    assert "CUDA failure 700" in server.log
    assert "exiting with status 3" in server.log


def test_out_of_memory_is_a_request_error_not_a_fatal_one() -> None:
    from service.fatal import is_fatal_message

    assert is_fatal_message("CUDA failure 700: an illegal memory access was encountered")
    assert not is_fatal_message("CUDA failure 2: out of memory ; GPU=0")
    assert not is_fatal_message("Failed to allocate memory for requested buffer of size 1e12")
    assert not is_fatal_message("Invalid rank for input: x Got: 3 Expected: 2")
