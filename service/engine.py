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
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import fatal
from .app import FATAL_GRACE_SECONDS, InferenceServer, stopping_on
from .errors import ModelNotReadyError, ServingError, Status
from .frontend_link import FrontendLink
from .grpc_api.servicer import SERVICE_NAME
from .ipc import (
    Catalog,
    CatalogModel,
    CatalogVersion,
    Channel,
    Failure,
    Infer,
    Regions,
)
from .model_config import ModelSignature
from .repository import ModelVersion
from .settings import Settings
from .supervisor import STOP_SIGNAL

log = logging.getLogger(__name__)

# How long a broadcast waits for a front end's acknowledgement.
ACK_SECONDS = 10.0


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
        # Every signature a catalog has carried: what front ends checked requests against.
        self._signatures: dict[tuple[str, int], ModelSignature] = {}
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

    def version_for(self, message: Infer) -> ModelVersion:
        """The version a front end's request runs on: the one it was checked against, or,
        when that one was replaced on the way and the client named no version, the
        model's default now, if it takes the same tensors."""
        registry = self.server.registry
        try:
            return registry.resolve(message.model, str(message.version))
        except ServingError:
            if not message.default_version:
                raise
        current = registry.resolve(message.model, "")
        checked = self._signatures.get((message.model, message.version))
        if checked is None or checked != current.signature:
            raise ModelNotReadyError(
                f"model '{message.model}' changed from version {message.version} to "
                f"{current.version}, whose inputs differ, while the request was on its way; "
                "retry"
            )
        return current

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
            for loaded in record.ready_versions():
                self._signatures[(name, loaded.version)] = loaded.signature
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
            for waiting_late in late:
                waiting_late.cancel()
            if late:
                log.warning("%d front end(s) did not acknowledge a change in time", len(late))

    async def stop(self, grace_seconds: float | None = None) -> None:
        await self.server.stop(grace_seconds)
        if self._listener is not None:
            self._listener.close()
        for link in list(self.links):
            link.close()


async def run_engine(
    settings: Settings,
    socket_path: Path,
    supervisor_pid: int,
    report: Callable[[str], None],
    codes: list[int],
) -> None:
    """The engine process until the supervisor says stop (0) or a fatal runtime error (3)."""
    with stopping_on((STOP_SIGNAL,)) as (stop, reasons):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {STOP_SIGNAL})  # held since the fork
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        engine = Engine(settings, socket_path, supervisor_pid)
        engine.server.on_loaded = lambda summary: report(f"loaded {summary}")
        await engine.start()
        await stop.wait()
        await engine.stop(FATAL_GRACE_SECONDS if reasons else None)
    if reasons:
        log.critical("the engine stops after a fatal runtime error: %s", reasons[0])
        codes.append(fatal.EXIT_CODE)
    else:
        codes.append(0)
