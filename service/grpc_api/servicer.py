"""inference.GRPCInferenceService: thin handlers over the model registry.

The inference RPCs themselves live in infer.py; `rpc_implementations` puts both
together, or, in a front-end process, the inference RPCs and a forwarder to the
engine for everything else. The gRPC port (`rpc_handler`) and the HTTP port
(service.http_api) call the same implementations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
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
from ..model_config import PLATFORM, ModelConfigError, parse_config_json
from ..protocol import grpc_service_pb2 as pb
from ..repository import ModelRegistry, ModelVersion, parse_version
from ..shared_memory import SharedMemoryRegions
from ..statistics import Duration, StatsSnapshot
from .auth import TokenGuard
from .errors import GRPC_CODES, translate_errors
from .wire import MalformedRequest, receive_infer_request, tolerant

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


RpcImplementation = Callable[[Any, Any], Any]


def rpc_implementations(
    implementations: Sequence[object],
    fallback: Callable[[str, Any], Any] | None = None,
) -> dict[str, RpcImplementation]:
    """Every RPC of the service descriptor by name: the first of `implementations` that has
    a method of that name, else `fallback(method, response type)` (a front end forwards the
    rest to the engine), else an UNIMPLEMENTED answer. gRPC and HTTP both call these."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    found: dict[str, RpcImplementation] = {}
    for method in service.methods:
        implementation = next(
            (
                getattr(owner, method.name)
                for owner in implementations
                if hasattr(owner, method.name)
            ),
            None,
        )
        if implementation is None:
            response_type = getattr(pb, method.output_type.name)
            implementation = (
                fallback(method.name, response_type) if fallback else unimplemented(method.name)
            )
        found[method.name] = implementation
    return found


def rpc_handler(
    implementations: dict[str, RpcImplementation], guard: TokenGuard | None = None
) -> grpc.GenericRpcHandler:
    """gRPC method handlers for `rpc_implementations`' answer."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        implementation = implementations[method.name]
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
