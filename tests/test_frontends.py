"""Front-end processes in front of one engine: what only this layout can get wrong.

The protocol tests of test_infer*.py and test_server_rpcs.py also run against
two front ends (their `server` fixture); here are batching across front ends,
changes seen by every front end at once, limits for the whole server, the
slabs' bound, and the faults: a front end killed, the engine killed, SIGTERM.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from service.settings import Settings
from service.supervisor import frontend_count
from tests import onnx_models as models
from tests.conftest import FrontendsServer
from tests.process import launch_on_loopback, start_on_loopback


def children(pid: int) -> dict[str, list[int]]:
    """The supervisor's child processes by role."""
    found: dict[str, list[int]] = {"engine": [], "frontend": []}
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    for child in (int(field) for field in text.split()):
        command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"service.supervisor" in command:
            found[command[command.index(b"service.supervisor") + 1].decode()].append(child)
    return found


def leftovers(pid: int) -> list[str]:
    return sorted(path.name for path in Path("/dev/shm").glob(f"batchwise-{pid}-*"))


def add(client: grpcclient.InferenceServerClient, value: float, rows: int = 1) -> np.ndarray:
    data = np.full((rows, 16), value, np.float32)
    inputs = [grpcclient.InferInput(name, [rows, 16], "FP32") for name in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(data)
    result = client.infer("add_sub", inputs)
    answer = result.as_numpy("OUTPUT0")
    assert answer is not None
    return answer


@pytest.fixture()
def started(standard_repository: Path) -> Iterator[list[FrontendsServer]]:
    """Servers a test starts with its own flags; whatever is left is killed after it."""
    servers: list[FrontendsServer] = []
    yield servers
    for server in servers:
        server.process.kill()


def start(servers: list[FrontendsServer], repository: Path, *flags: str) -> FrontendsServer:
    server = FrontendsServer(start_on_loopback(repository, "--frontend-processes", "2", *flags))
    servers.append(server)
    return server


def test_requests_from_both_front_ends_batch_together(frontends_server: FrontendsServer) -> None:
    """Many connections land on both front ends; each answer is its own request's."""
    errors: list[str] = []
    barrier = threading.Barrier(12)

    def one_client(index: int) -> None:
        with frontends_server.client() as client:
            barrier.wait()
            for _ in range(30):
                answer = add(client, float(index))
                if not np.all(answer == 2 * index):
                    errors.append(f"client {index} got {answer[0, :3]}")

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:5]
    metrics = _metrics(frontends_server)
    per_frontend = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("batchwise_frontend_requests_total{")
    ]
    assert len(per_frontend) == 2 and all(count > 0 for count in per_frontend), metrics


def _metrics(server: FrontendsServer) -> str:
    port = server.process.metrics_port()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


def _counter(metrics: str, name: str, frontend: int) -> float:
    prefix = f'{name}{{frontend="{frontend}"}} '
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"{prefix!r} not in the metrics:\n{metrics}")


def _slow_input(rows: int = 64) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("x", [rows, 512], "FP32")
    tensor.set_data_from_numpy(np.full((rows, 512), 0.01, np.float32))
    return [tensor]


def _clients_at_once(
    count: int,
    work: Callable[[grpcclient.InferenceServerClient], str],
    server: FrontendsServer,
    before_release: Callable[[], None] | None = None,
) -> list[str]:
    """`count` clients, each on its own connection, start `work` together."""
    outcomes: list[str] = []
    barrier = threading.Barrier(count + 1)

    def one_client() -> None:
        with server.client() as client:
            client.is_server_live()  # connected before the start
            barrier.wait()
            try:
                outcomes.append(work(client))
            except InferenceServerException as error:
                outcomes.append(f"{error.status()} {error.message()}")

    threads = [threading.Thread(target=one_client) for _ in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    if before_release is not None:
        before_release()
    for thread in threads:
        thread.join(120)
    assert len(outcomes) == count, outcomes
    return outcomes


def _run_slow(rows: int) -> Callable[[grpcclient.InferenceServerClient], str]:
    def work(client: grpcclient.InferenceServerClient) -> str:
        result = client.infer("slow", _slow_input(rows))
        return "ok" if result.as_numpy("y") is not None else "no output"

    return work


def test_one_batch_holds_requests_of_both_front_ends(
    tmp_path: Path, started: list[FrontendsServer]
) -> None:
    """Requests queued behind a long run, from clients on both front ends, leave the
    queue as one batch: larger than what either front end sent."""
    models.save(
        models.slow_matmul(512, 256),
        tmp_path,
        "held",
        config=(
            "max_batch_size: 32\ndynamic_batching { }\n"
            'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
        ),
    )
    server = start(started, tmp_path, "--metrics-port", "0")
    blocker = threading.Thread(
        target=lambda: server.client().infer("held", _slow_input(32)), daemon=True
    )

    def block() -> None:
        blocker.start()
        time.sleep(0.3)  # the long run has started; what comes now waits in the queue

    with server.client() as client:
        ones = grpcclient.InferInput("x", [1, 512], "FP32")
        ones.set_data_from_numpy(np.ones((1, 512), np.float32))
        unit = client.infer("held", [ones]).as_numpy("y")
    count = 16
    values = iter(range(count))
    lock = threading.Lock()

    def work(client: grpcclient.InferenceServerClient) -> str:
        with lock:
            index = next(values)
        data = np.full((1, 512), float(index), np.float32)
        tensor = grpcclient.InferInput("x", [1, 512], "FP32")
        tensor.set_data_from_numpy(data)
        mine = client.infer("held", [tensor]).as_numpy("y")
        # The model is linear: each answer is its own index times the answer to ones.
        right = mine is not None and np.allclose(mine, index * unit, rtol=1e-3, atol=1e-3)
        return "ok" if right else f"wrong answer for {index}"

    assert _clients_at_once(count, work, server, block) == ["ok"] * count
    blocker.join(60)
    metrics = _metrics(server)
    per_frontend = [_counter(metrics, "batchwise_frontend_requests_total", i) for i in (0, 1)]
    assert sum(per_frontend) == count + 2, per_frontend
    with server.client() as client:
        stats = client.get_inference_statistics("held").model_stats[0]
    largest = max(batch.batch_size for batch in stats.batch_stats)
    assert largest > max(per_frontend), (largest, per_frontend)


def test_changes_reach_every_front_end_before_the_answer(
    standard_repository: Path, started: list[FrontendsServer]
) -> None:
    """A model loaded, or a region registered, through one connection is usable at once
    through any other, whichever front end it lands on."""
    server = start(
        started,
        standard_repository,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "add_sub",
        "--allow-shared-memory",
    )
    tensor = grpcclient.InferInput("x", [2, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((2, 3), np.float32))
    with server.client() as admin:
        admin.load_model("fixed_shape")
        for _ in range(8):
            with server.client() as client:
                assert np.all(client.infer("fixed_shape", [tensor]).as_numpy("y") == 2.0)
        admin.unload_model("fixed_shape")
        for _ in range(8):
            with server.client() as client, pytest.raises(InferenceServerException) as gone:
                client.infer("fixed_shape", [tensor])
            assert "fixed_shape" in gone.value.message()
        key = f"/bwtest{os.getpid()}_frontends"
        data = np.full((1, 16), 3.0, np.float32)
        handle = shm.create_shared_memory_region("fe", key, data.nbytes)
        try:
            shm.set_shared_memory_region(handle, [data])
            admin.register_system_shared_memory("fe", key, data.nbytes)
            for _ in range(8):
                with server.client() as client:
                    first = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
                    first.set_shared_memory("fe", data.nbytes)
                    second = grpcclient.InferInput("INPUT1", [1, 16], "FP32")
                    second.set_data_from_numpy(data)
                    result = client.infer("add_sub", [first, second])
                    assert np.all(result.as_numpy("OUTPUT0") == 6.0)
            admin.unregister_system_shared_memory()
        finally:
            shm.destroy_shared_memory_region(handle)


def test_the_in_flight_limit_holds_for_the_whole_server(
    standard_repository: Path, started: list[FrontendsServer]
) -> None:
    server = start(started, standard_repository, "--max-requests-in-flight", "2")
    outcomes = _clients_at_once(8, _run_slow(256), server)
    refused = [outcome for outcome in outcomes if outcome != "ok"]
    assert 1 <= outcomes.count("ok") <= 3, outcomes  # a third may start once one has ended
    assert all(
        "UNAVAILABLE" in outcome and "limit of 2 requests in flight" in outcome
        for outcome in refused
    ), refused


def test_a_request_larger_than_the_slab_is_refused(
    standard_repository: Path, started: list[FrontendsServer]
) -> None:
    server = start(started, standard_repository, "--frontend-slab-bytes", str(1024 * 1024))
    with server.client() as client:
        with pytest.raises(InferenceServerException) as refused:
            client.infer("slow", _slow_input(600))  # 1.2 MB
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "--frontend-slab-bytes" in refused.value.message()
        assert np.all(add(client, 1.0) == 2.0)  # and it goes on serving


def test_a_killed_front_end_fails_only_its_own_requests(
    standard_repository: Path, started: list[FrontendsServer]
) -> None:
    server = start(started, standard_repository, "--metrics-port", "0")
    supervisor = server.process.process.pid
    victim = children(supervisor)["frontend"][0]

    def kill_one() -> None:
        time.sleep(0.3)  # requests are in flight: the slow model runs them one at a time
        os.kill(victim, signal.SIGKILL)

    outcomes = _clients_at_once(12, _run_slow(64), server, kill_one)
    kinds = {outcome.split(" ")[0] for outcome in outcomes}
    assert kinds <= {"ok", "StatusCode.UNAVAILABLE"}, outcomes
    assert "ok" in kinds, outcomes  # the other front end's requests were answered
    server.process.wait_for("front end 0 connected (start 2)")
    assert victim not in children(supervisor)["frontend"]
    for _ in range(8):
        with server.client() as client:
            assert np.all(add(client, 2.0) == 4.0)
    metrics = _metrics(server)
    assert _counter(metrics, "batchwise_frontend_starts_total", 0) == 2
    assert _counter(metrics, "batchwise_frontend_up", 0) == 1
    assert server.stop() == 0, server.process.log
    assert leftovers(supervisor) == []


def test_a_killed_engine_ends_the_server_with_3(
    standard_repository: Path, started: list[FrontendsServer]
) -> None:
    server = start(started, standard_repository)
    supervisor = server.process.process.pid
    roles = children(supervisor)
    os.kill(roles["engine"][0], signal.SIGKILL)
    assert server.process.wait_exit(60) == 3, server.process.log
    for pid in roles["frontend"]:
        assert not Path(f"/proc/{pid}").exists()
    assert leftovers(supervisor) == []


def test_sigterm_drains_every_process(
    standard_repository: Path, started: list[FrontendsServer]
) -> None:
    """In-flight requests are answered, then every process exits."""
    server = start(started, standard_repository)
    supervisor = server.process.process.pid
    roles = children(supervisor)

    def stop() -> None:
        time.sleep(0.3)
        server.process.process.send_signal(signal.SIGTERM)

    outcomes = _clients_at_once(6, _run_slow(64), server, stop)
    assert outcomes == ["ok"] * 6, outcomes
    assert server.process.wait_exit(60) == 0, server.process.log
    assert "server stopped" in server.process.log
    assert not any(Path(f"/proc/{pid}").exists() for pid in roles["engine"] + roles["frontend"])
    assert leftovers(supervisor) == []


def test_health_and_metadata_through_front_ends(frontends_server: FrontendsServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(frontends_server.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "add_sub"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        reply = stub.Check(health_pb2.HealthCheckRequest(service="broken"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with frontends_server.client() as client:
        assert client.get_server_metadata().name == "batchwise"
        assert client.get_model_config("add_sub").config.max_batch_size == 8


def test_too_little_shared_memory_stops_the_start_with_a_reason(
    standard_repository: Path,
) -> None:
    server = launch_on_loopback(
        standard_repository, "--frontend-processes", "2", "--frontend-slab-bytes", str(2**40)
    )
    try:
        assert server.wait_exit(60) == 1, server.log
    finally:
        server.kill()
    assert "cannot set aside 1099511627776 bytes of shared memory" in server.log
    assert "lower --frontend-slab-bytes" in server.log
    assert leftovers(server.process.pid) == []


def test_tokens_are_checked_by_the_front_ends(
    standard_repository: Path, started: list[FrontendsServer]
) -> None:
    server = FrontendsServer(
        start_on_loopback(
            standard_repository,
            "--frontend-processes",
            "2",
            env={
                "BATCHWISE_AUTH_TOKEN": "inference-secret-0123",
                "BATCHWISE_ADMIN_TOKEN": "admin-secret-456789",
            },
        )
    )
    started.append(server)
    with server.client() as client:
        for call in (
            lambda: add(client, 1.0),
            lambda: client.get_model_metadata("add_sub"),  # forwarded to the engine
        ):
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        good = {"authorization": "Bearer inference-secret-0123"}
        assert client.get_model_metadata("add_sub", headers=good).name == "add_sub"
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("add_sub", headers=good)
        assert refused.value.status() == "StatusCode.PERMISSION_DENIED"


def test_the_default_layout_follows_cores_and_shared_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """-1 picks front ends only with the cores to run them and the /dev/shm to start them."""
    defaults = Settings()
    assert defaults.frontend_processes == -1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert frontend_count(defaults) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert frontend_count(defaults) == 2
    assert frontend_count(dataclasses.replace(defaults, frontend_slab_bytes=2**40)) == 0
    assert frontend_count(dataclasses.replace(defaults, frontend_processes=3)) == 3
    assert frontend_count(dataclasses.replace(defaults, frontend_processes=0)) == 0
