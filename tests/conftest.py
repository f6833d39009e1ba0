"""Shared fixtures: real servers on 127.0.0.1 with port 0, real tritonclient clients."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from service.app import InferenceServer
from service.settings import Settings
from tests import onnx_models as models
from tests.process import ServerProcess, start_on_loopback


class ServerThread:
    """An InferenceServer running on its own event loop in a background thread.

    The sync tritonclient used by the tests would block an event loop shared
    with the server, so the server gets a loop of its own.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.server = InferenceServer(settings)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.call(self.server.start())
        self.call(self.server.wait_until_loaded())
        return self

    def call(self, coroutine, timeout: float = 60):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.server.http_port}"

    def client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.url)

    def __exit__(self, *exc_info: object) -> None:
        self.call(self.server.stop(grace_seconds=5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def serve(repository: Path, **overrides: object) -> ServerThread:
    values: dict[str, object] = {
        "model_repository": repository,
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "http_host": "127.0.0.1",
        "http_port": -1,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        **overrides,
    }
    return ServerThread(Settings(**values))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def standard_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one model per feature the protocol tests exercise."""
    root = tmp_path_factory.mktemp("repository")
    models.save(
        models.add_sub(),
        root,
        "add_sub",
        config=(
            'name: "add_sub"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
            'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },'
            ' { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
            'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },'
            ' { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
            "dynamic_batching { }\n"
        ),
    )
    numeric = [name for name in models.ONNX_TYPES if name != "BYTES"]
    models.save(models.identity(numeric), root, "identity_numeric")
    models.save(models.identity(["BYTES"]), root, "identity_bytes")
    typed = [name for name in models.ONNX_TYPES if name not in ("FP16", "BF16")]
    models.save(models.identity(typed), root, "identity_typed")
    models.save(models.scale(2.0, [2, 3]), root, "fixed_shape")
    for version in (1, 2, 3):
        models.save(models.scale(float(version), ["batch", 4]), root, "versioned", version)
    (root / "versioned" / "config.pbtxt").write_text(
        "version_policy { latest { num_versions: 2 } }\n"
    )
    models.save(
        models.slow_matmul(512, 256),
        root,
        "slow",
        config=(
            "max_batch_size: 0\n"
            'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
        ),
    )
    models.save(models.tied_add(), root, "tied_dims")
    models.save(models.fixed_reshape(), root, "fragile")
    broken = root / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not an onnx model")
    return root


@pytest.fixture(scope="session")
def inprocess_server(standard_repository: Path) -> Iterator[ServerThread]:
    with serve(standard_repository) as running:
        yield running


@pytest.fixture(scope="session")
def server(inprocess_server: ServerThread) -> ServerThread:
    """The standard repository served in this process (tests may look inside it)."""
    return inprocess_server


class FrontendsServer:
    """`batchwise serve --frontend-processes 2` as a process: only its port is reachable."""

    def __init__(self, process: ServerProcess) -> None:
        self.process = process
        self.url = f"127.0.0.1:{process.grpc_port()}"
        self.http_url = f"127.0.0.1:{process.http_port()}"

    def client(self) -> grpcclient.InferenceServerClient:
        """A client on a connection of its own: gRPC would otherwise share one connection
        between all channels to the same address in this process, and so one front end."""
        return grpcclient.InferenceServerClient(
            self.url,
            # Given channel_args, tritonclient sets none of its own: its message limits too.
            channel_args=[
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.max_receive_message_length", 2**31 - 1),
            ],
        )

    def stop(self) -> int:
        self.process.process.send_signal(signal.SIGTERM)
        return self.process.wait_exit()


@pytest.fixture(scope="session")
def frontends_server(standard_repository: Path) -> Iterator[FrontendsServer]:
    """The standard repository behind two front-end processes and an engine."""
    running = FrontendsServer(
        start_on_loopback(standard_repository, "--frontend-processes", "2", "--metrics-port", "0")
    )
    yield running
    assert running.stop() == 0, running.process.log


LAYOUTS = ("one process", "two front ends")


@pytest.fixture(scope="session", params=LAYOUTS)
def either_server(request: pytest.FixtureRequest) -> ServerThread | FrontendsServer:
    """For modules whose tests must hold in both layouts: `server = either_server`."""
    name = "inprocess_server" if request.param == LAYOUTS[0] else "frontends_server"
    found: ServerThread | FrontendsServer = request.getfixturevalue(name)
    return found


# tritonclient.http's clients run on gevent, whose hub belongs to the thread that made it;
# closed from another thread (the garbage collector may run in a server's), they raise.
# So each is closed by the test that made it and kept from the collector until the end.
_HTTP_CLIENTS: list[httpclient.InferenceServerClient] = []


@contextlib.contextmanager
def http_client(url: str, **options: Any) -> Iterator[httpclient.InferenceServerClient]:
    connection = httpclient.InferenceServerClient(url, **options)
    _HTTP_CLIENTS.append(connection)
    try:
        yield connection
    finally:
        connection.close()
        connection.close = lambda: None  # type: ignore[method-assign]


@pytest.fixture()
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with server.client() as connection:
        yield connection


@pytest.fixture()
def stub(server: ServerThread) -> Iterator[object]:
    """tritonclient's own generated stub, for requests tritonclient's API cannot build."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    channel = grpc.insecure_channel(
        server.url,
        options=[
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_receive_message_length", 2**31 - 1),
        ],
    )
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()
