"""The engine process: models, batching, statistics and metrics behind front-end processes.

It is the one-process server without a gRPC port (InferenceServer with
`listen=False`): front ends connect over a Unix socket, send decoded requests
whose tensors they wrote into their slab, and get answers written into the
engine's slab for them. Batches form across all front ends, and the limits
(`--max-requests-in-flight`, queue bounds) hold for the server as a whole.
Any other RPC arrives as its serialized request and runs the one-process
server's own handler. When the models or the shared memory regions change,
every front end is told, and the RPC that changed them answers only once all
have acknowledged, so the next request through any front end sees the change.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import fatal
from .app import FATAL_GRACE_SECONDS, InferenceServer
from .datatypes import split_length_prefixed
from .errors import RequestTooLargeError, ServingError, Status
from .grpc_api.errors import INTERNAL_MESSAGE
from .grpc_api.servicer import SERVICE_NAME
from .inference import InferenceRequest, InferenceResult
from .ipc import (
    TEXT,
    Ack,
    Answer,
    Call,
    Catalog,
    CatalogModel,
    CatalogVersion,
    Channel,
    Failure,
    Hello,
    Infer,
    Refusal,
    Regions,
    Release,
    Reply,
    TensorRef,
    Welcome,
)
from .protocol import grpc_service_pb2 as pb
from .settings import Settings
from .slabs import Slab, SlabAllocator, SlabError, slab_prefix
from .supervisor import STOP_SIGNAL

log = logging.getLogger(__name__)

_METHODS = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
# RPCs after which every front end must see the change before the caller hears back.
_CHANGES_REGIONS = frozenset({"SystemSharedMemoryRegister", "SystemSharedMemoryUnregister"})
_CHANGES_MODELS = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})
# How long a broadcast waits for a front end's acknowledgement.
ACK_SECONDS = 10.0


class ForwardedAbortError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ForwardedContext:
    """What the one-process handlers use of a grpc.aio context, for a forwarded call."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise ForwardedAbortError(code, details)

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


def decode_tensor(slab: Slab, ref: TensorRef) -> np.ndarray:
    """A request tensor out of a front end's slab: a view, except text."""
    shape = tuple(ref.shape)
    if ref.datatype == TEXT:  # checked as UTF-8 by the front end
        data = slab.view[ref.offset : ref.offset + ref.nbytes]
        elements = split_length_prefixed(ref.name, data, int(np.prod(shape)))
        text = np.empty(len(elements), dtype=object)
        text[:] = [bytes(element).decode("utf-8") for element in elements]
        return text.reshape(shape)
    return slab.array(ref.offset, ref.nbytes, np.dtype(ref.datatype), shape)


class FrontendLink:
    """The engine's side of one front end's connection."""

    def __init__(self, engine: Engine, channel: Channel) -> None:
        self._engine = engine
        self._channel = channel
        self.frontend = -1
        self._requests: Slab | None = None
        self._answers: Slab | None = None
        self._answer_space: SlabAllocator | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        try:
            await self._serve()
        finally:
            self._channel.close()
            for waiting in self._acks.values():
                if not waiting.done():
                    waiting.set_result(None)  # a front end that left acknowledges nothing
            self._engine.links.discard(self)
            if self.frontend >= 0:
                log.info("front end %d disconnected", self.frontend)

    async def _serve(self) -> None:
        hello = await self._channel.receive()
        if not isinstance(hello, Hello):
            return
        self.frontend = hello.frontend
        size = self._engine.settings.frontend_slab_bytes
        name = f"{slab_prefix(self._engine.supervisor_pid)}{hello.frontend}-{hello.generation}-out"
        try:
            self._requests = Slab(hello.slab, hello.slab_bytes, create=False)
            self._answers = Slab(name, size, create=True)
        except SlabError as error:
            log.error("front end %d cannot be served: %s", hello.frontend, error)
            return
        self._answer_space = SlabAllocator(size)
        self._channel.send(Welcome(name, size))
        self._channel.send(self._engine.catalog_message(0))
        self._channel.send(self._engine.regions_message(0))
        self._engine.links.add(self)
        self._engine.note_frontend(hello.frontend, hello.generation)
        while True:
            message = await self._channel.receive()
            if message is None:
                return
            if isinstance(message, Infer):
                self._engine.frontend_requests[self.frontend] += 1
                self._spawn(self._infer(message))
            elif isinstance(message, Release):
                for offset in message.offsets:
                    self._answer_space.free(offset)
            elif isinstance(message, Call):
                self._spawn(self._call(message))
            elif isinstance(message, Ack):
                waiting = self._acks.pop(message.seq, None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(None)
            elif isinstance(message, Failure):
                self._engine.record_failure(message)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def tell(self, message: Catalog | Regions) -> asyncio.Future[None]:
        """Send a change; the future resolves when this front end has applied it."""
        waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[message.seq] = waiting
        self._channel.send(message)
        return waiting

    async def _infer(self, message: Infer) -> None:
        engine = self._engine
        state = engine.server.state
        try:
            state.admit_inference()
        except ServingError as error:
            self._refuse(message.id, error.status.value, error.message)
            return
        state.request_started()
        alone = message.alone and state.alone()
        try:
            result = await self._run(message, alone)
            self._answer(message.id, result)
        except ServingError as error:
            self._refuse(message.id, error.status.value, error.message)
        except Exception:
            log.exception("unexpected error serving a front end's request")
            self._refuse(message.id, Status.INTERNAL.value, INTERNAL_MESSAGE)
        finally:
            state.request_finished()
            if alone:
                state.linger()

    async def _run(self, message: Infer, alone: bool) -> InferenceResult:
        assert self._requests is not None
        version = self._engine.server.registry.resolve(message.model, str(message.version))
        version.enter()
        try:
            inputs = {ref.name: decode_tensor(self._requests, ref) for ref in message.inputs}
            request = InferenceRequest(
                message.request_id,
                inputs,
                tuple(message.outputs),
                message.batch_size,
                message.received_ns,
                message.parameters,
                message.deadline_ns,
                message.log_id,
            )
            return await version.infer(request, alone)
        finally:
            version.leave()

    def _answer(self, request_id: int, result: InferenceResult) -> None:
        if self._channel.closing or self._answers is None or self._answer_space is None:
            return  # the front end has gone: nobody reads this answer
        refs: list[TensorRef] = []
        for output in result.outputs:
            offset = self._answer_space.allocate(len(output.raw))
            if offset is None:
                for ref in refs:
                    self._answer_space.free(ref.offset)
                error = RequestTooLargeError(
                    f"the answer does not fit in the engine's shared memory for this front "
                    f"end now ({self._answer_space.size} bytes, --frontend-slab-bytes)"
                )
                self._refuse(request_id, error.status.value, error.message)
                return
            self._answers.write(offset, output.raw)
            refs.append(
                TensorRef(output.name, output.datatype, list(output.shape), offset, len(output.raw))
            )
        self._channel.send(Answer(request_id, refs))

    def _refuse(self, request_id: int, status: str, message: str) -> None:
        if not self._channel.closing:
            self._channel.send(Refusal(request_id, status, message))

    async def _call(self, message: Call) -> None:
        method = _METHODS.get(message.method)
        handler = getattr(self._engine.server.servicer, message.method, None)
        if method is None or handler is None:
            self._refuse(
                message.id, Status.UNIMPLEMENTED.value, f"{message.method} is not supported"
            )
            return
        request = getattr(pb, method.input_type.name).FromString(message.request)
        try:
            response = await handler(request, ForwardedContext(message.metadata))
        except ForwardedAbortError as abort:
            self._refuse(message.id, abort.code.name, abort.message)
            return
        if message.method in _CHANGES_REGIONS:
            await self._engine.broadcast(self._engine.regions_message)
        elif message.method in _CHANGES_MODELS:
            await self._engine.broadcast(self._engine.catalog_message)
        if not self._channel.closing:
            self._channel.send(Reply(message.id, response.SerializeToString()))


class FrontendCollector(Collector):
    """The front ends' part of the engine's /metrics: one scrape shows the whole server."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        connected = {link.frontend for link in list(engine.links)}
        indexes = sorted(set(engine.frontend_starts) | connected)
        up = GaugeMetricFamily(
            "batchwise_frontend_up",
            "1 while the front-end process is connected",
            labels=["frontend"],
        )
        requests = CounterMetricFamily(
            "batchwise_frontend_requests",
            "inference requests a front end passed to the engine",
            labels=["frontend"],
        )
        starts = CounterMetricFamily(
            "batchwise_frontend_starts",
            "times a front end connected (more than 1: it was restarted)",
            labels=["frontend"],
        )
        for index in indexes:
            label = [str(index)]
            up.add_metric(label, 1.0 if index in connected else 0.0)
            requests.add_metric(label, engine.frontend_requests[index])
            starts.add_metric(label, engine.frontend_starts[index])
        yield from (up, requests, starts)


class Engine:
    def __init__(self, settings: Settings, socket_path: Path, supervisor_pid: int) -> None:
        self.settings = settings
        self.supervisor_pid = supervisor_pid
        self.server = InferenceServer(settings, listen=False)
        self.server.change_listeners.append(self._models_changed)
        self.links: set[FrontendLink] = set()
        self._socket_path = socket_path
        self._listener: asyncio.Server | None = None
        self._seq = itertools.count(1)
        self._pending: set[asyncio.Task[None]] = set()
        # Per front-end index, over its restarts: for /metrics.
        self.frontend_requests: collections.Counter[int] = collections.Counter()
        self.frontend_starts: collections.Counter[int] = collections.Counter()
        self.server.metrics.registry.register(FrontendCollector(self))

    async def start(self) -> None:
        await self.server.start()
        self._listener = await asyncio.start_unix_server(self._connected, str(self._socket_path))
        log.info("engine listening for front ends")

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await FrontendLink(self, Channel(reader, writer)).serve()

    def note_frontend(self, frontend: int, generation: int) -> None:
        self.frontend_starts[frontend] += 1
        log.info("front end %d connected (start %d)", frontend, generation + 1)

    def record_failure(self, failure: Failure) -> None:
        try:
            version = self.server.registry.resolve(failure.model, str(failure.version))
        except ServingError:
            return  # unloaded meanwhile
        version.record_failure(failure.received_ns, Status(failure.status))

    def catalog_message(self, seq: int) -> Catalog:
        registry = self.server.registry
        models: dict[str, CatalogModel] = {}
        for name, record in registry.records.items():
            versions = {
                loaded.version: CatalogVersion(
                    loaded.name,
                    loaded.version,
                    loaded.label,
                    loaded.signature,
                    loaded.text_encoder.settings if loaded.text_encoder else None,
                )
                for loaded in record.ready_versions()
            }
            try:
                default: int | None = registry.resolve(name, "").version
            except ServingError:
                default = None
            models[name] = CatalogModel(versions, default)
        state = self.server.state
        serving = {"": state.ready, SERVICE_NAME: state.ready}
        serving.update({name: registry.is_ready(name) for name in registry.records})
        return Catalog(
            seq,
            pickle.dumps(models),
            registry.loading_done,
            state.ready,
            serving,
        )

    def regions_message(self, seq: int) -> Regions:
        table = [
            (region.name, region.key, region.offset, region.byte_size)
            for region in (self.server.regions.status("") if self.server.regions.enabled else [])
        ]
        return Regions(seq, table)

    def _models_changed(self) -> None:
        task = asyncio.create_task(self.broadcast(self.catalog_message))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def broadcast(self, build: Any) -> None:
        """Send every front end the current state; return once all have applied it."""
        waiting = [link.tell(build(next(self._seq))) for link in list(self.links)]
        if waiting:
            _done, late = await asyncio.wait(waiting, timeout=ACK_SECONDS)
            if late:
                log.warning("%d front end(s) did not acknowledge a change in time", len(late))

    async def stop(self, grace_seconds: float | None = None) -> None:
        await self.server.stop(grace_seconds)
        if self._listener is not None:
            self._listener.close()
        for link in list(self.links):
            link._channel.close()


async def run_engine(
    settings: Settings,
    socket_path: Path,
    supervisor_pid: int,
    report: Callable[[str], None],
    codes: list[int],
) -> None:
    """The engine process until the supervisor says stop (0) or a fatal runtime error (3)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(STOP_SIGNAL, stop.set)
    reasons: list[str] = []

    def on_fatal(reason: str) -> None:
        reasons.append(reason)
        loop.call_soon_threadsafe(stop.set)

    unsubscribe = fatal.subscribe(on_fatal)
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    engine = Engine(settings, socket_path, supervisor_pid)
    engine.server.on_loaded = lambda summary: report(f"loaded {summary}")
    try:
        await engine.start()
        await stop.wait()
        await engine.stop(FATAL_GRACE_SECONDS if reasons else None)
    finally:
        unsubscribe()
    if reasons:
        log.critical("the engine stops after a fatal runtime error: %s", reasons[0])
        codes.append(fatal.EXIT_CODE)
    else:
        codes.append(0)
