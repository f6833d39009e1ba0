"""The server process: start listening, load models, serve, drain on signal.

Order matters for orchestrators. The gRPC and HTTP ports open first, so liveness
succeeds while models load and readiness (ServerReady, grpc.health.v1) turns
true only once loading is done. On SIGTERM or SIGINT, readiness and health go
NOT_SERVING at once, new inference requests get UNAVAILABLE, in-flight ones
finish (up to the grace period), and the port closes only once requests have
stopped arriving (ServerState.wait_quiet); then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2

from . import fatal
from .admission import ServerState
from .errors import StartupError
from .grpc_api.infer import InferenceCalls
from .grpc_api.server import build_grpc_server
from .grpc_api.servicer import SERVICE_NAME, InferenceServicer, rpc_implementations
from .http_api.server import HttpEndpoint
from .metrics import MetricsEndpoint
from .repository import ModelRegistry
from .runtime import available_providers, runtime_version
from .settings import Settings
from .shared_memory import SharedMemoryRegions

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# After draining, calls still open (health watches, stragglers) get this long.
FINAL_STOP_SECONDS = 1.0
# After a fatal error, in-flight requests get at most this long to finish.
FATAL_GRACE_SECONDS = 5.0


class FatalServerError(Exception):
    """The server stopped because of a fatal runtime error; the process exits non-zero."""


class InferenceServer:
    """The whole server in one process, or, with `listen=False`, the engine behind
    front-end processes (service.engine): everything but the gRPC port."""

    def __init__(self, settings: Settings, listen: bool = True) -> None:
        self.settings = settings
        self._listen = listen
        # Called whenever what the server serves or reports as healthy may have changed.
        self.change_listeners: list[Callable[[], None]] = []
        # Set by the engine: the supervisor announces readiness once front ends listen too.
        self.on_loaded: Callable[[str], None] | None = None
        self.registry = ModelRegistry(settings)
        self.state = ServerState(
            self.registry,
            settings.strict_readiness,
            settings.max_requests_in_flight,
            settings.linger_microseconds * 1000,
        )
        self.health = health.aio.HealthServicer()
        self.metrics = MetricsEndpoint(self.registry, settings.triton_metrics)
        self.regions = SharedMemoryRegions(settings.allow_shared_memory, settings.max_message_bytes)
        self.grpc_port = 0
        self.http_port = 0
        self.http: HttpEndpoint | None = None
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._loading: asyncio.Task[None] | None = None
        self._polling: asyncio.Task[None] | None = None
        self._health_updates: set[asyncio.Task[None]] = set()
        self.registry.on_change = self._model_changed

    async def start(self) -> None:
        """Listen on both ports; model loading continues in the background."""
        if not self.registry.root.is_dir():
            raise StartupError(f"model repository {self.registry.root} is not a folder")
        self.servicer = InferenceServicer(
            self.registry, self.state, self.regions, self.settings.model_control_mode
        )
        await self._set_overall_health(NOT_SERVING)
        if self._listen:
            calls = InferenceCalls(self.registry, self.state, self.regions)
            rpcs = rpc_implementations((calls, self.servicer))
            server, self.grpc_port = build_grpc_server(self.settings, rpcs, self.health)
            self._server = server
            await server.start()
            log.info("gRPC server listening on %s:%d", self.settings.grpc_host, self.grpc_port)
            if self.settings.http_port != 0:
                self.http = HttpEndpoint(self.settings, rpcs)
                self.http_port = await self.http.start()
                log.info(
                    "HTTP server listening on %s://%s:%d",
                    self.http.scheme,
                    self.settings.http_host,
                    self.http_port,
                )
        if self.settings.metrics_port >= 0:
            self.metrics_port = self.metrics.start(
                self.settings.metrics_host, self.settings.metrics_port
            )
            log.info(
                "metrics endpoint listening on http://%s:%d/metrics",
                self.settings.metrics_host,
                self.metrics_port,
            )
        log.info(
            "onnxruntime %s, providers: %s; loading models from %s",
            runtime_version(),
            ", ".join(available_providers()),
            self.registry.root,
        )
        if self.settings.model_control_mode == "explicit" and not (
            self.settings.admin_token or self.settings.auth_token
        ):
            log.warning(
                "model control is explicit and no --admin-token is set: anyone who reaches "
                "the gRPC port can load and unload models"
            )
        self._loading = asyncio.create_task(self._load_models())

    async def wait_until_loaded(self) -> None:
        if self._loading is not None:
            await asyncio.shield(self._loading)

    def _startup_models(self) -> list[str] | None:
        """Which models to load at start: all, or in explicit mode only --load-model's."""
        if self.settings.model_control_mode != "explicit":
            return None
        names = [name.strip() for name in self.settings.load_model.split(",") if name.strip()]
        return None if "*" in names else names

    def _notify_listeners(self) -> None:
        for listener in self.change_listeners:
            listener()

    def _model_changed(self, name: str) -> None:
        self._notify_listeners()
        status = SERVING if self.registry.is_ready(name) else NOT_SERVING
        task = asyncio.create_task(self._update_health(name, status))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _update_health(self, name: str, status: int) -> None:
        await self.health.set(name, status)
        if self.registry.loading_done and not self.state.draining:
            # Strict readiness depends on every model: the whole may have changed too.
            await self._set_overall_health(SERVING if self.state.ready else NOT_SERVING)

    async def _load_models(self) -> None:
        polling = self.settings.model_control_mode == "poll"
        snapshot = await asyncio.to_thread(self.registry.fingerprints) if polling else {}
        try:
            await self.registry.load_all(self._startup_models())
        except Exception:
            log.exception("loading the model repository failed")
            self.registry.loading_done = True
            raise
        for name in self.registry.records:
            status = SERVING if self.registry.is_ready(name) else NOT_SERVING
            await self.health.set(name, status)
        await self._set_overall_health(SERVING if self.state.ready else NOT_SERVING)
        self._notify_listeners()
        entries = self.registry.index(ready_only=False)
        ready = sum(1 for entry in entries if entry.state == "READY")
        summary = f"{ready} of {len(entries)} model versions ready"
        if self.on_loaded is not None:
            self.on_loaded(summary)
        else:
            log.info("server ready: %s", summary)
        if polling:
            self._polling = asyncio.create_task(
                self.registry.poll(self.settings.repository_poll_seconds, snapshot)
            )

    async def _set_overall_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Drain: refuse new work, let in-flight requests finish, then close."""
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self.state.draining = True
        self._notify_listeners()
        await self.health.enter_graceful_shutdown()
        log.info("shutting down: %d request(s) in flight, grace %.1fs", self.state.in_flight, grace)
        deadline = asyncio.get_running_loop().time() + grace
        try:
            await asyncio.wait_for(self.state.wait_idle(), timeout=grace)
        except TimeoutError:
            log.warning(
                "grace period over with %d request(s) still in flight", self.state.in_flight
            )
        if self._listen:
            await self.state.wait_quiet(deadline)
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self._polling is not None:
            self._polling.cancel()
        if self.http is not None:
            await self.http.stop(FINAL_STOP_SECONDS)
        if self._server is not None:
            await self._server.stop(FINAL_STOP_SECONDS)
        self.metrics.stop()
        self.registry.close()
        self.regions.close()
        await asyncio.to_thread(self.registry.join, FINAL_STOP_SECONDS * 10)
        log.info("server stopped")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain and return.

    A fatal runtime error (service.fatal) also stops the server, after a
    drain of at most FATAL_GRACE_SECONDS, and raises FatalServerError.
    """
    with stopping_on((signal.SIGTERM, signal.SIGINT)) as (stop_requested, fatal_reasons):
        # Process-wide, so set here and not by InferenceServer (tests run several in one process).
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        log.info("GIL switch interval %g ms", sys.getswitchinterval() * 1000)
        server = InferenceServer(settings)
        await server.start()
        await stop_requested.wait()
        if fatal_reasons:
            await server.stop(min(settings.shutdown_grace_seconds, FATAL_GRACE_SECONDS))
            raise FatalServerError(fatal_reasons[0])
        await server.stop()


@contextlib.contextmanager
def stopping_on(signals: Sequence[int]) -> Iterator[tuple[asyncio.Event, list[str]]]:
    """An event that any of `signals`, or a fatal runtime error, sets; the fatal
    errors' reasons are collected in the list."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    reasons: list[str] = []

    def on_fatal(reason: str) -> None:
        reasons.append(reason)
        loop.call_soon_threadsafe(stop.set)

    unsubscribe = fatal.subscribe(on_fatal)
    try:
        yield stop, reasons
    finally:
        unsubscribe()
