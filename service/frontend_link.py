"""The engine's side of one front end's connection.

Requests arrive as headers naming tensors in the front end's slab; the engine
reads them in place (views, no copy), runs them through the model's scheduler
with every other front end's, and writes the outputs into its own slab for this
front end. Any other RPC arrives serialized and runs the one-process server's
handler with a context that turns its abort into a refusal message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from .datatypes import split_length_prefixed
from .errors import RequestTooLargeError, ServingError, Status
from .grpc_api.errors import INTERNAL_MESSAGE
from .inference import InferenceRequest, InferenceResult
from .ipc import (
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
from .protocol import grpc_service_pb2 as pb
from .slabs import Slab, SlabAllocator, SlabError, slab_prefix

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)
# A refusal's message is cut here: it may quote names a client sent.
MAX_REFUSAL_CHARS = 64 * 1024

_METHODS = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
# RPCs after which every front end must see the change before the caller hears back.
_CHANGES_REGIONS = frozenset({"SystemSharedMemoryRegister", "SystemSharedMemoryUnregister"})
_CHANGES_MODELS = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})


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
            for slab in (self._requests, self._answers):
                if slab is not None:
                    slab.unlink()  # a front end that died before it could
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

    def close(self) -> None:
        self._channel.close()

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def tell(self, message: Catalog | Regions) -> asyncio.Future[None]:
        """Send a change; the future resolves when this front end has applied it."""
        waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[message.seq] = waiting
        waiting.add_done_callback(lambda _: self._acks.pop(message.seq, None))
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
        version = self._engine.version_for(message)
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
            result = await version.infer(request, alone)
        finally:
            version.leave()
        return InferenceResult(result.outputs, version.version)

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
        assert result.model_version is not None
        self._channel.send(Answer(request_id, result.model_version, refs))

    def _refuse(self, request_id: int, status: str, message: str) -> None:
        if not self._channel.closing:
            # Messages can quote what a client sent: bounded, so the frame always fits.
            self._channel.send(Refusal(request_id, status, message[:MAX_REFUSAL_CHARS]))

    async def _call(self, message: Call) -> None:
        method = _METHODS.get(message.method)
        handler = getattr(self._engine.server.servicer, message.method, None)
        if method is None or handler is None:
            self._refuse(
                message.id, Status.UNIMPLEMENTED.value, f"{message.method} is not supported"
            )
            return
        try:
            request = getattr(pb, method.input_type.name).FromString(message.request)
            response = await handler(request, ForwardedContext(message.metadata))
        except ForwardedAbortError as abort:
            self._refuse(message.id, abort.code.name, abort.message)
            return
        except Exception:
            log.exception("unexpected error in a forwarded %s", message.method)
            self._refuse(message.id, Status.INTERNAL.value, INTERNAL_MESSAGE)
            return
        if message.method in _CHANGES_REGIONS:
            await self._engine.broadcast(self._engine.regions_message)
        elif message.method in _CHANGES_MODELS:
            await self._engine.broadcast(self._engine.catalog_message)
        if not self._channel.closing:
            try:
                self._channel.send(Reply(message.id, response.SerializeToString()))
            except FrameTooLargeError:
                self._refuse(message.id, Status.RESOURCE_EXHAUSTED.value, "the answer is too large")
