"""The inference RPCs (ModelInfer, ModelStreamInfer): decode, admit, run, answer.

They need from the models only what `Models` names, so the same calls serve
in the one-process server (the model registry itself) and in a front-end
process (the engine's catalog, service.frontend).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc

from ..admission import ServerState
from ..errors import ServingError, Status
from ..inference import InferenceRequest, InferenceResult, RequestBuilder, Tokenizer
from ..logs import ACCESS_LOGGER, REQUEST_ID, new_request_id
from ..model_config import ModelSignature
from ..protocol import grpc_service_pb2 as pb
from ..shared_memory import SharedMemoryRegions
from .codec import (
    INLINE_DECODE_LIMIT,
    decode_infer_request,
    encode_infer_response,
    python_decode_cost,
)
from .errors import INTERNAL_MESSAGE, translate_errors
from .wire import MalformedRequest, ReceivedInferRequest

log = logging.getLogger(__name__)


class ServedVersion(Protocol):
    """A model version as the inference path uses it."""

    name: str
    version: int
    signature: ModelSignature
    label: str

    @property
    def text_encoder(self) -> Tokenizer | None: ...

    def enter(self) -> None: ...

    def leave(self) -> None: ...

    def record_failure(self, received_ns: int, status: Status) -> None: ...

    async def infer(self, request: InferenceRequest, alone: bool = False) -> InferenceResult: ...


class Models(Protocol):
    """Where the inference path finds a request's model version."""

    @property
    def max_request_elements(self) -> int: ...

    async def find(self, name: str, version: str) -> ServedVersion: ...


class InferenceCalls:
    def __init__(self, models: Models, state: ServerState, regions: SharedMemoryRegions) -> None:
        self._registry = models
        self._state = state
        self._regions = regions

    async def _infer(
        self, request: ReceivedInferRequest, time_remaining: float | None = None
    ) -> pb.ModelInferResponse:
        received = time.perf_counter_ns()
        state = self._state
        state.admit_inference()
        state.request_started()
        alone = state.alone()
        try:
            return await self._infer_admitted(request, received, time_remaining, alone)
        finally:
            state.request_finished()
            if alone:
                state.linger()

    async def _infer_admitted(
        self,
        request: ReceivedInferRequest,
        received: int,
        time_remaining: float | None,
        alone: bool,
    ) -> pb.ModelInferResponse:
        version = await self._registry.find(
            request.message.model_name, request.message.model_version
        )
        # Held until the answer is built: a replaced or unloaded version waits for this.
        version.enter()
        try:
            return await self._infer_on(version, request, received, time_remaining, alone)
        finally:
            version.leave()

    async def _infer_on(
        self,
        version: ServedVersion,
        request: ReceivedInferRequest,
        received: int,
        time_remaining: float | None,
        alone: bool,
    ) -> pb.ModelInferResponse:
        builder = RequestBuilder(
            version.signature,
            version.label,
            version.text_encoder,
            self._registry.max_request_elements,
        )
        try:
            if python_decode_cost(request) > INLINE_DECODE_LIMIT:
                core_request, placements = await asyncio.to_thread(
                    decode_infer_request, request, builder, received, self._regions
                )
                # Others may have arrived while it was decoded.
                alone = alone and self._state.in_flight == 1
            else:
                core_request, placements = decode_infer_request(
                    request, builder, received, self._regions
                )
        except ServingError as error:
            version.record_failure(received, error.status)
            raise
        if time_remaining is not None:
            core_request.deadline_ns = received + int(time_remaining * 1e9)
        core_request.log_id = REQUEST_ID.get()
        result = await version.infer(core_request, alone)
        ran = version.version if result.model_version is None else result.model_version
        return encode_infer_response(version.name, ran, request.message.id, result, placements)

    @translate_errors
    async def ModelInfer(
        self, request: ReceivedInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        request_id = _request_id(context)
        REQUEST_ID.set(request_id)
        # Trailing metadata rides along with the status: no extra message on the wire.
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        started = time.perf_counter_ns()
        code = "INTERNAL"
        try:
            response = await self._infer(request, context.time_remaining())
            code = "OK"
            return response
        except ServingError as error:
            code = error.status.value
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            _access_log(request.message, code, started)

    async def ModelStreamInfer(
        self,
        requests: AsyncIterator[ReceivedInferRequest | MalformedRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Requests on one stream run concurrently; each response or error is written as it ends.

        A failed request is reported in its response's error_message and the
        stream carries on, as Triton does.
        """
        write_lock = asyncio.Lock()
        pending: set[asyncio.Task[None]] = set()

        stream_id = _request_id(context)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, stream_id),))

        async def serve_one(request: ReceivedInferRequest, index: int) -> None:
            REQUEST_ID.set(f"{stream_id}/{index}")
            started = time.perf_counter_ns()
            code = "OK"
            try:
                reply = pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except ServingError as error:
                code = error.status.value
                reply = self._stream_error(request.message, error.message)
            except Exception:
                code = "INTERNAL"
                log.exception("unexpected error in ModelStreamInfer")
                reply = self._stream_error(request.message, INTERNAL_MESSAGE)
            _access_log(request.message, code, started)
            async with write_lock:
                await context.write(reply)

        async def refuse_one(malformed: MalformedRequest) -> None:
            reply = self._stream_error(pb.ModelInferRequest(), malformed.describe())
            async with write_lock:
                await context.write(reply)

        try:
            index = 0
            async for request in requests:
                if isinstance(request, MalformedRequest):
                    # The stream's framing is intact: answer this message, read the next.
                    task = asyncio.create_task(refuse_one(request))
                else:
                    task = asyncio.create_task(serve_one(request, index))
                index += 1
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)
        finally:
            # The client went away or the server is stopping: nobody will read the rest.
            for task in pending:
                task.cancel()

    @staticmethod
    def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
        reply = pb.ModelStreamInferResponse(error_message=message)
        reply.infer_response.model_name = request.model_name
        reply.infer_response.model_version = request.model_version
        reply.infer_response.id = request.id
        return reply


REQUEST_ID_HEADER = "x-request-id"
_access = logging.getLogger(ACCESS_LOGGER)


def _request_id(context: Any) -> str:
    """The client's x-request-id (bounded to 128 printable characters), or a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            cleaned = "".join(ch for ch in value[:128] if ch.isprintable())
            if cleaned:
                return cleaned
    return new_request_id()


def _access_log(request: pb.ModelInferRequest, code: str, started_ns: int) -> None:
    if not _access.isEnabledFor(logging.INFO):
        return
    rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 0
    milliseconds = (time.perf_counter_ns() - started_ns) / 1e6
    _access.info(
        "model=%s version=%s code=%s rows=%d duration_ms=%.3f",
        request.model_name,
        request.model_version or "-",
        code,
        rows,
        milliseconds,
        extra={
            "fields": {
                "model": request.model_name,
                "version": request.model_version,
                "code": code,
                "rows": rows,
                "duration_ms": round(milliseconds, 3),
            }
        },
    )
