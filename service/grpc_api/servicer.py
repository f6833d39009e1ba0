"""inference.GRPCInferenceService: thin handlers over the model registry."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from .. import __version__
from ..admission import ServerState
from ..errors import (
    FailedPreconditionError,
    InvalidInputError,
    ServingError,
    Status,
    UnsupportedError,
)
from ..inference import RequestBuilder
from ..logs import ACCESS_LOGGER, REQUEST_ID, new_request_id
from ..model_config import PLATFORM, ModelConfigError, parse_config_json
from ..protocol import grpc_service_pb2 as pb
from ..repository import ModelRegistry, ModelVersion, parse_version
from ..shared_memory import SharedMemoryRegions
from ..statistics import Duration, StatsSnapshot
from .auth import TokenGuard
from .codec import (
    INLINE_DECODE_LIMIT,
    decode_infer_request,
    encode_infer_response,
    python_decode_cost,
)
from .errors import GRPC_CODES, INTERNAL_MESSAGE, translate_errors
from .wire import MalformedRequest, ReceivedInferRequest, receive_infer_request, tolerant

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "batchwise"
# Only what is implemented: perf_analyzer reads `statistics` to decide whether
# to call ModelStatistics around each measurement window.
EXTENSIONS = ("model_configuration", "statistics")
# Added in explicit model control mode, where RepositoryModelLoad/Unload work.
CONTROL_EXTENSIONS = ("model_repository",)
# Added with --allow-shared-memory.
SHARED_MEMORY_EXTENSIONS = ("system_shared_memory",)


def _duration(target: pb.StatisticDuration, source: Duration) -> None:
    target.count, target.ns = source.count, source.ns


def _statistics(version: ModelVersion, snapshot: StatsSnapshot) -> pb.ModelStatistics:
    stats = pb.ModelStatistics(
        name=version.name,
        version=str(version.version),
        last_inference=snapshot.last_inference_ms,
        inference_count=snapshot.inference_count,
        execution_count=snapshot.execution_count,
    )
    infer = stats.inference_stats
    for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        _duration(getattr(infer, name), getattr(snapshot, name))
    for size, batch in sorted(snapshot.batches.items()):
        entry = stats.batch_stats.add(batch_size=size)
        _duration(entry.compute_input, batch.compute_input)
        _duration(entry.compute_infer, batch.compute_infer)
        _duration(entry.compute_output, batch.compute_output)
    return stats


class InferenceServicer:
    def __init__(
        self,
        registry: ModelRegistry,
        state: ServerState,
        regions: SharedMemoryRegions,
        control_mode: str = "none",
    ) -> None:
        self._registry = registry
        self._state = state
        self._regions = regions
        self._control_mode = control_mode

    # ------------------------------------------------------------- health ---

    @translate_errors
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @translate_errors
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._state.ready)

    @translate_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        ready = not self._state.draining and self._registry.is_ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    # ----------------------------------------------------------- metadata ---

    @translate_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        extensions = list(EXTENSIONS)
        if self._control_mode == "explicit":
            extensions += CONTROL_EXTENSIONS
        if self._regions.enabled:
            extensions += SHARED_MEMORY_EXTENSIONS
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=extensions
        )

    @translate_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        version = self._registry.resolve(request.name, request.version)
        record = self._registry.record(request.name)
        signature = version.signature
        response = pb.ModelMetadataResponse(
            name=version.name,
            versions=[str(v.version) for v in record.ready_versions()],
            platform=PLATFORM,
        )
        for spec in signature.inputs:
            response.inputs.add(
                name=spec.name,
                datatype=spec.datatype.name,
                shape=spec.client_shape(signature.batching),
            )
        for spec in signature.outputs:
            response.outputs.add(
                name=spec.name,
                datatype=spec.datatype.name,
                shape=spec.client_shape(signature.batching),
            )
        return response

    @translate_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        version = self._registry.resolve(request.name, request.version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(version.config)
        return response

    @translate_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            record = self._registry.record(request.name)
            if request.version:
                versions = [self._registry.resolve(request.name, request.version)]
            else:
                versions = record.ready_versions()
        else:
            if request.version:
                parse_version(request.version)  # a bad version is still a client mistake
            versions = list(self._registry.loaded_versions())
        response = pb.ModelStatisticsResponse()
        for version in versions:
            response.model_stats.append(_statistics(version, version.stats.snapshot()))
        return response

    @translate_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in self._registry.index(ready_only=request.ready):
            response.models.add(
                name=entry.name, version=entry.version, state=entry.state, reason=entry.reason
            )
        return response

    # ------------------------------------------------------ model control ---

    def _check_control(self, rpc: str, repository_name: str) -> None:
        if self._control_mode != "explicit":
            raise FailedPreconditionError(
                f"{rpc} needs --model-control-mode explicit; this server runs in mode "
                f"'{self._control_mode}'"
                + (" (it follows the repository on disk)" if self._control_mode == "poll" else "")
            )
        if repository_name:
            raise InvalidInputError(
                f"repository_name '{repository_name[:80]}': this server has one repository; "
                "leave repository_name empty"
            )
        self._state.check_accepting()  # not while draining, nor before start-up loading ends

    @translate_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        self._check_control("RepositoryModelLoad", request.repository_name)
        override = None
        for key, value in request.parameters.items():
            if key == "config":
                if value.WhichOneof("parameter_choice") != "string_param":
                    raise InvalidInputError(
                        "parameter 'config' must be a string holding the model configuration "
                        "as JSON"
                    )
                try:
                    override = parse_config_json(value.string_param)
                except ModelConfigError as error:
                    raise InvalidInputError(f"parameter 'config': {error}") from None
            elif key.startswith("file:"):
                raise UnsupportedError(
                    f"parameter '{key[:80]}': loading model files sent with the request is not "
                    "supported; put them in the repository"
                )
            else:
                raise InvalidInputError(
                    f"unknown parameter '{key[:80]}'; RepositoryModelLoad takes 'config'"
                )
        await self._registry.load_model(request.model_name, override)
        return pb.RepositoryModelLoadResponse()

    @translate_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_control("RepositoryModelUnload", request.repository_name)
        for key in request.parameters:
            if key != "unload_dependents":  # no ensembles here: nothing depends on a model
                raise InvalidInputError(
                    f"unknown parameter '{key[:80]}'; RepositoryModelUnload takes "
                    "'unload_dependents'"
                )
        await self._registry.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------ shared memory ---

    @translate_errors
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._regions.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @translate_errors
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._regions.status(request.name):
            entry = response.regions[region.name]
            entry.name, entry.key = region.name, region.key
            entry.offset, entry.byte_size = region.offset, region.byte_size
        return response

    @translate_errors
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._regions.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # No CUDA region can be registered (CudaSharedMemoryRegister stays unimplemented), so
    # status lists none and unregistering succeeds: clients such as perf_analyzer clean
    # up both kinds of regions after using system shared memory.

    @translate_errors
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        self._regions.status_cuda(request.name)
        return pb.CudaSharedMemoryStatusResponse()

    @translate_errors
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        self._regions.unregister_cuda(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    # ---------------------------------------------------------- inference ---

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
        version = self._registry.resolve(request.message.model_name, request.message.model_version)
        # Held until the answer is built: a replaced or unloaded version waits for this.
        version.enter()
        try:
            return await self._infer_on(version, request, received, time_remaining, alone)
        finally:
            version.leave()

    async def _infer_on(
        self,
        version: ModelVersion,
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
        return encode_infer_response(
            version.name, version.version, request.message.id, result, placements
        )

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


def unimplemented(method: str) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            GRPC_CODES[Status.UNIMPLEMENTED],
            f"{method} is not supported by this server; ServerMetadata.extensions lists the "
            "extensions it implements",
        )

    return handler


def _refusing_malformed(implementation: Any) -> Any:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        return await implementation(request, context)

    return handler


def _guarded(method: str, implementation: Any, guard: TokenGuard) -> Any:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            guard.check(method, context.invocation_metadata())
        except ServingError as error:
            await context.abort(GRPC_CODES[error.status], error.message)
        return await implementation(request, context)

    return handler


def rpc_handler(
    servicer: InferenceServicer, guard: TokenGuard | None = None
) -> grpc.GenericRpcHandler:
    """Method handlers for every RPC in the service descriptor, implemented or not."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        implementation = getattr(servicer, method.name, None) or unimplemented(method.name)
        if not method.client_streaming:  # a stream's messages are checked one by one
            implementation = _refusing_malformed(implementation)
        if guard is not None and guard.enabled:
            implementation = _guarded(method.name, implementation, guard)
        factory = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        if request_type is pb.ModelInferRequest:
            # Raw tensor contents stay in the received buffer (see wire.py).
            deserialize: Callable[[bytes], Any] = receive_infer_request
        else:
            deserialize = request_type.FromString
        handlers[method.name] = factory(
            implementation,
            request_deserializer=tolerant(deserialize, method.input_type.full_name),
            response_serializer=response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
