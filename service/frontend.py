"""A front-end process: the gRPC port's per-call work, in front of the engine.

Several front ends listen on one port (SO_REUSEPORT) and each does, on its
own interpreter and core, what costs Python time per call: receiving and
parsing the message, auth, decoding and checking tensors against the
signature, tokenizing, and encoding the answer. The checked tensors go to the
engine through this front end's slab; the answer comes back through the
engine's. Every other RPC is forwarded to the engine as it arrived. What the
front end knows of the models (signatures, readiness for health) and of the
client's shared memory regions, it is told by the engine whenever it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from .admission import ServerState
from .engine_link import EngineGoneError, EngineLink
from .errors import (
    ModelNotReadyError,
    ServingError,
    Status,
)
from .grpc_api.errors import GRPC_CODES
from .grpc_api.infer import InferenceCalls
from .grpc_api.server import build_grpc_server
from .grpc_api.servicer import rpc_implementations
from .http_api.server import HttpEndpoint
from .inference import InferenceRequest, InferenceResult
from .ipc import (
    Catalog,
    CatalogModel,
    CatalogVersion,
    Regions,
)
from .model_config import ModelSignature
from .protocol import grpc_service_pb2 as pb
from .settings import Settings
from .shared_memory import SharedMemoryRegions
from .slabs import SlabError
from .supervisor import listen_for_stop
from .text import TextEncoder

log = logging.getLogger(__name__)


class RemoteVersion:
    """A servable version as a front end sees it: enough to decode and check requests."""

    def __init__(
        self,
        entry: CatalogVersion,
        link: EngineLink,
        encoder: TextEncoder | None,
        default: bool = False,
    ) -> None:
        """`default`: reached by a request that named no version."""
        self.default = default
        self.name = entry.name
        self.version = entry.version
        self.label = entry.label
        self.signature: ModelSignature = entry.signature
        self._encoder = encoder
        self._link = link

    @property
    def text_encoder(self) -> TextEncoder | None:
        return self._encoder

    def enter(self) -> None:
        """The engine holds the version while it runs the request."""

    def leave(self) -> None:
        pass

    def record_failure(self, received_ns: int, status: Status) -> None:
        self._link.record_failure(self.name, self.version, received_ns, status)

    async def infer(self, request: InferenceRequest, alone: bool = False) -> InferenceResult:
        return await self._link.infer(self, request, alone, self.default)


class RemoteCatalog:
    """The engine's servable versions, kept current by its Catalog messages."""

    def __init__(self, link: EngineLink, settings: Settings) -> None:
        self._link = link
        self.max_request_elements = settings.max_request_elements
        self.loading_done = False
        self._all_ready = False
        self.serving: dict[str, bool] = {}
        self._versions: dict[tuple[str, int], RemoteVersion] = {}
        self._defaults: dict[str, RemoteVersion] = {}
        self._encoders: dict[Any, TextEncoder] = {}
        self._changed = asyncio.Event()

    def update(self, message: Catalog) -> None:
        models: dict[str, CatalogModel] = pickle.loads(message.versions)
        versions: dict[tuple[str, int], RemoteVersion] = {}
        defaults: dict[str, RemoteVersion] = {}
        encoders: dict[Any, TextEncoder] = {}
        for name, model in models.items():
            for number, entry in model.versions.items():
                encoder = None
                if entry.text is not None:
                    encoder = self._encoders.get(entry.text) or TextEncoder(entry.text)
                    encoders[entry.text] = encoder
                versions[(name, number)] = RemoteVersion(entry, self._link, encoder)
                if number == model.default:
                    defaults[name] = RemoteVersion(entry, self._link, encoder, default=True)
        self._versions, self._defaults, self._encoders = versions, defaults, encoders
        self.loading_done = message.loading_done
        self._all_ready = message.all_ready
        self.serving = dict(message.serving)
        self._changed.set()
        self._changed = asyncio.Event()

    def all_ready(self) -> bool:
        return self._all_ready

    def _lookup(self, name: str, version: str) -> RemoteVersion | None:
        if not version:
            return self._defaults.get(name)
        if not (version.isdigit() and version.isascii()):
            return None
        return self._versions.get((name, int(version)))

    async def find(self, name: str, version: str) -> RemoteVersion:
        found = self._lookup(name, version)
        if found is not None:
            return found
        # Not here: the engine says why (the same words as a one-process server), or it
        # has the version and its news is on the way.
        changed = self._changed
        request = pb.ModelMetadataRequest(name=name, version=version).SerializeToString()
        await self._link.call("ModelMetadata", request, [])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout=1.0)
        found = self._lookup(name, version)
        if found is None:
            raise ModelNotReadyError(f"model '{name}' is changing on this server; retry")
        return found


class Readiness:
    """ServerReady and ModelReady answered here: a draining front end is not ready, whatever
    the engine (not draining yet) would say."""

    def __init__(self, state: ServerState, link: EngineLink) -> None:
        self._state = state
        self._link = link

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self._state.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> Any:
        if self._state.draining:
            return pb.ModelReadyResponse(ready=False)
        try:
            answer = await self._link.call("ModelReady", request.SerializeToString(), [])
        except ServingError as error:
            await context.abort(GRPC_CODES[error.status], error.message)
        return pb.ModelReadyResponse.FromString(answer)


def _sync_regions(regions: SharedMemoryRegions, message: Regions) -> None:
    """Map what the engine has registered, forget what it no longer has."""
    if not regions.enabled:
        return
    wanted: dict[str, tuple[str, str, int, int]] = {
        entry[0]: (entry[0], entry[1], entry[2], entry[3]) for entry in message.regions
    }
    for region in regions.status(""):
        if wanted.get(region.name) != (region.name, region.key, region.offset, region.byte_size):
            regions.unregister(region.name)
    have = {region.name for region in regions.status("")}
    for name, (_, key, offset, byte_size) in wanted.items():
        if name not in have:
            try:
                regions.register(name, key, offset, byte_size)
            except ServingError as error:
                log.warning("front end cannot open shared memory region: %s", error.message)
            except OSError as error:
                log.warning("front end cannot open shared memory region: %s", error)


def _forwarder(link: EngineLink) -> Callable[[str, Any], Callable[..., Awaitable[Any]]]:
    """Handlers that pass an RPC to the engine and its answer back."""

    def make(method: str, response_type: Any) -> Callable[..., Awaitable[Any]]:
        async def forward(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = [
                (key, value)
                for key, value in context.invocation_metadata() or ()
                if isinstance(value, str)
            ]
            try:
                response = await link.call(method, request.SerializeToString(), metadata)
            except ServingError as error:
                await context.abort(GRPC_CODES[error.status], error.message)
            return response_type.FromString(response)

        return forward

    return make


async def _apply_health(
    servicer: health.aio.HealthServicer, catalog: RemoteCatalog, draining: bool
) -> None:
    for service, serving in catalog.serving.items():
        status = serving and not draining
        await servicer.set(
            service,
            health_pb2.HealthCheckResponse.SERVING
            if status
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )


async def serve_frontend(
    settings: Settings,
    frontend: int,
    generation: int,
    socket_path: Path,
    supervisor_pid: int,
    report: Callable[[str], None],
    codes: list[int],
) -> None:
    """Run one front end until the supervisor says stop (drain, 0), until the engine goes
    (3), or not at all (1); the exit code goes to `codes`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    listen_for_stop(loop, stop)
    try:
        link, first_catalog, first_regions = await EngineLink.connect(
            socket_path, frontend, generation, settings, supervisor_pid
        )
    except (SlabError, EngineGoneError) as error:
        log.error("front end %d cannot start: %s", frontend, error)
        codes.append(1)
        return
    catalog = RemoteCatalog(link, settings)
    catalog.update(first_catalog)
    regions = SharedMemoryRegions(settings.allow_shared_memory, settings.max_message_bytes)
    _sync_regions(regions, first_regions)
    state = ServerState(
        catalog,
        settings.strict_readiness,
        settings.max_requests_in_flight,
        settings.linger_microseconds * 1000,
    )
    health_servicer = health.aio.HealthServicer()
    updates: set[asyncio.Task[None]] = set()

    def on_catalog(message: Catalog) -> None:
        catalog.update(message)
        task = asyncio.create_task(_apply_health(health_servicer, catalog, state.draining))
        updates.add(task)
        task.add_done_callback(updates.discard)

    link.on_catalog = on_catalog
    link.on_regions = lambda message: _sync_regions(regions, message)
    reader = asyncio.create_task(link.run())
    rpcs = rpc_implementations(
        (InferenceCalls(catalog, state, regions), Readiness(state, link)), _forwarder(link)
    )
    server, port = build_grpc_server(settings, rpcs, health_servicer, reuse_port=True)
    http = HttpEndpoint(settings, rpcs) if settings.http_port != 0 else None
    await _apply_health(health_servicer, catalog, False)
    await server.start()
    log.info("front end %d: gRPC server listening on %s:%d", frontend, settings.grpc_host, port)
    if http is not None:
        await http.start(reuse_port=True)
        log.info(
            "front end %d: HTTP server listening on %s://%s:%d",
            frontend,
            http.scheme,
            settings.http_host,
            http.port,
        )
    report(f"listening {frontend}")
    stopping = asyncio.create_task(stop.wait())
    engine_gone = asyncio.create_task(link.gone.wait())
    await asyncio.wait((stopping, engine_gone), return_when=asyncio.FIRST_COMPLETED)
    if link.gone.is_set() and not stop.is_set():
        log.error("front end %d: the engine has stopped; exiting", frontend)
        if http is not None:
            await http.stop(0)
        await server.stop(0)
        codes.append(3)
        return
    state.draining = True
    await health_servicer.enter_graceful_shutdown()
    deadline = loop.time() + settings.shutdown_grace_seconds
    try:
        await asyncio.wait_for(state.wait_idle(), timeout=settings.shutdown_grace_seconds)
    except TimeoutError:
        log.warning("front end %d: grace period over with %d in flight", frontend, state.in_flight)
    await state.wait_quiet(deadline)
    if http is not None:
        await http.stop(1.0)
    await server.stop(1.0)
    reader.cancel()
    regions.close()
    codes.append(0)
