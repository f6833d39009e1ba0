"""A front end's connection to the engine: requests out through its slab, answers back.

The front end writes a checked request's tensors into its request slab and sends
a header; the engine's answer names where the outputs lie in the engine's slab
for this front end. Allocations are freed when the engine has answered, whether
or not the caller still waits (a client that went away), so neither slab leaks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import RequestTooLargeError, ServerUnavailableError, ServingError, Status
from .inference import InferenceRequest, InferenceResult, OutputTensor
from .ipc import (
    MAX_FRAME_BYTES,
    TEXT,
    Ack,
    Answer,
    Call,
    Catalog,
    Channel,
    Failure,
    FrameTooLargeError,
    Hello,
    Infer,
    Refusal,
    Regions,
    Release,
    Reply,
    TensorRef,
    Welcome,
)
from .settings import Settings
from .slabs import Slab, SlabAllocator, slab_prefix

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .frontend import RemoteVersion

CONNECT_SECONDS = 60.0
# How long a front end polls for the answer to a lone request rather than sleep.
AWAKE_WHILE_ALONE_NS = 2_000_000


class EngineGoneError(ServerUnavailableError):
    """The engine closed the connection: this front end can serve nothing more."""


def _serialized_text(array: np.ndarray) -> bytes:
    """Text elements as length-prefixed UTF-8, the BYTES wire layout."""
    parts: list[bytes] = []
    for element in array.reshape(-1):
        data = element.encode("utf-8") if isinstance(element, str) else bytes(element)
        parts.append(len(data).to_bytes(4, "little"))
        parts.append(data)
    return b"".join(parts)


class EngineLink:
    """The front end's connection to the engine, and its slabs."""

    def __init__(self, channel: Channel, requests: Slab, answers: Slab) -> None:
        self._channel = channel
        self._requests = requests
        self._request_space = SlabAllocator(requests.size)
        self._answers = answers
        self._ids = itertools.count(1)
        # id -> (waiting caller, its allocations in the request slab)
        self._pending: dict[int, tuple[asyncio.Future[Any], list[int]]] = {}
        self.on_catalog: Callable[[Catalog], None] = lambda message: None
        self.on_regions: Callable[[Regions], None] = lambda message: None
        self.gone = asyncio.Event()

    @classmethod
    async def connect(
        cls,
        socket_path: Path,
        frontend: int,
        generation: int,
        settings: Settings,
        supervisor_pid: int,
    ) -> tuple[EngineLink, Catalog, Regions]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_SECONDS
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(socket_path))
                break
            except OSError:
                if loop.time() > deadline:
                    raise EngineGoneError("the engine did not accept a connection") from None
                await asyncio.sleep(0.05)
        channel = Channel(reader, writer)
        name = f"{slab_prefix(supervisor_pid)}{frontend}-{generation}-in"
        requests = Slab(name, settings.frontend_slab_bytes, create=True)
        try:
            channel.send(Hello(frontend, generation, name, requests.size))
            welcome = await channel.receive()
            catalog = await channel.receive()
            regions = await channel.receive()
        finally:
            requests.unlink()  # mapped by both sides now (or never will be)
        if (
            not isinstance(welcome, Welcome)
            or not isinstance(catalog, Catalog)
            or not isinstance(regions, Regions)
        ):
            raise EngineGoneError("the engine did not answer the front end's greeting")
        answers = Slab(welcome.slab, welcome.slab_bytes, create=False)
        answers.unlink()
        return cls(channel, requests, answers), catalog, regions

    async def run(self) -> None:
        """Read the engine's messages until it goes away."""
        try:
            while True:
                message = await self._channel.receive()
                if message is None:
                    return
                if isinstance(message, Answer):
                    self._answered(message)
                elif isinstance(message, Refusal):
                    self._settle(message.id, RemoteFailureError(message.status, message.message))
                elif isinstance(message, Reply):
                    self._settle(message.id, message.response)
                elif isinstance(message, Catalog | Regions):
                    try:
                        (self.on_catalog if isinstance(message, Catalog) else self.on_regions)(
                            message  # type: ignore[arg-type]
                        )
                    except Exception:
                        log.exception("front end could not apply the engine's news")
                    self._channel.send(Ack(message.seq))
        finally:
            self.gone.set()
            error = EngineGoneError("the engine has stopped")
            for waiting, _ in self._pending.values():
                if not waiting.done():
                    waiting.set_exception(error)
            self._pending.clear()

    def _settle(self, request_id: int, outcome: Any) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        waiting, allocations = entry
        for offset in allocations:
            self._request_space.free(offset)
        if waiting.done():
            return  # the caller was cancelled (client gone)
        if isinstance(outcome, Exception):
            waiting.set_exception(outcome)
        else:
            waiting.set_result(outcome)

    def _answered(self, answer: Answer) -> None:
        """Copy the outputs out of the engine's slab at once and free them there."""
        outputs = tuple(
            OutputTensor(
                ref.name, ref.datatype, tuple(ref.shape), self._answers.read(ref.offset, ref.nbytes)
            )
            for ref in answer.outputs
        )
        self._channel.send(Release([ref.offset for ref in answer.outputs]))
        self._settle(answer.id, InferenceResult(outputs, answer.version))

    def _send(self, message: Infer | Call, allocations: list[int]) -> asyncio.Future[Any]:
        if self.gone.is_set():
            for offset in allocations:
                self._request_space.free(offset)
            raise ServerUnavailableError("the server's engine has stopped; retry")
        try:
            self._channel.send(message)
        except FrameTooLargeError:
            for offset in allocations:
                self._request_space.free(offset)
            raise RequestTooLargeError(
                f"the request's names, id and parameters take more than {MAX_FRAME_BYTES} "
                "bytes, more than passes to the server's engine"
            ) from None
        waiting: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[message.id] = (waiting, allocations)
        return waiting

    async def infer(
        self,
        version: RemoteVersion,
        request: InferenceRequest,
        alone: bool,
        default_version: bool,
    ) -> InferenceResult:
        refs: list[TensorRef] = []
        allocations: list[int] = []
        for name, array in request.inputs.items():
            if array.dtype == object:
                data: Any = _serialized_text(array)
                size = len(data)
            else:
                data = np.ascontiguousarray(array)
                size = data.nbytes
            offset = self._request_space.allocate(size)
            if offset is None:
                for taken in allocations:
                    self._request_space.free(taken)
                raise RequestTooLargeError(
                    f"the request's tensors do not fit in this front end's shared memory now "
                    f"({self._request_space.size} bytes, --frontend-slab-bytes); retry, or "
                    "raise the limit"
                )
            allocations.append(offset)
            if size:
                self._requests.write(offset, data)
            kind = TEXT if array.dtype == object else array.dtype.str
            refs.append(TensorRef(name, kind, list(array.shape), offset, size))
        message = Infer(
            next(self._ids),
            version.name,
            version.version,
            refs,
            list(request.outputs),
            request.parameters,
            request.request_id,
            request.log_id,
            request.received_ns,
            request.deadline_ns,
            request.batch_size,
            alone,
            default_version,
        )
        waiting = self._send(message, allocations)
        if alone:
            self._keep_awake(waiting, time.perf_counter_ns() + AWAKE_WHILE_ALONE_NS)
        result: InferenceResult = await waiting
        return result

    def _keep_awake(self, waiting: asyncio.Future[Any], until_ns: int) -> None:
        """Poll instead of sleeping while a lone request is at the engine: a sleeping
        process takes longer to wake (on a virtual machine above all) than a small
        model's answer takes to come back."""
        if not waiting.done() and time.perf_counter_ns() < until_ns:
            asyncio.get_running_loop().call_soon(self._keep_awake, waiting, until_ns)

    async def call(self, method: str, request: bytes, metadata: list[tuple[str, str]]) -> bytes:
        response: bytes = await self._send(Call(next(self._ids), method, request, metadata), [])
        return response

    def record_failure(self, model: str, version: int, received_ns: int, status: Status) -> None:
        if not self.gone.is_set():
            self._channel.send(Failure(model, version, received_ns, status.value))


class RemoteFailureError(ServingError):
    """A failure the engine reported, with its status."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = Status(status) if status in Status._value2member_map_ else Status.INTERNAL
