"""The KServe v2 / Triton HTTP routes, as an ASGI application.

Every route is one RPC of inference.GRPCInferenceService (calls.py); this
module only moves between URLs and JSON on one side and protocol messages on
the other. Bodies are read up to --max-message-bytes and no further, and
decoded (gzip, deflate) up to the same bound.
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec

from ..errors import InvalidInputError, ServingError
from ..grpc_api.auth import TokenGuard
from ..grpc_api.errors import INTERNAL_MESSAGE
from ..grpc_api.servicer import RpcImplementation
from ..protocol import grpc_service_pb2 as pb
from .calls import CallFailed, HttpCallContext
from .messages import message_to_json, parameter_from_json
from .tensors import (
    HEADER_LENGTH,
    decode_json_object,
    encode_infer_response,
    json_output_bytes,
    parse_infer_request,
)

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# Headers handed to the implementations as call metadata.
_METADATA_HEADERS = ("authorization", "x-request-id")
# Above this many bytes of JSON, parsing and encoding leave the event loop.
_INLINE_JSON_BYTES = 64 * 1024
_DECOMPRESSORS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class HttpError(Exception):
    """An answer decided before any RPC ran (routing, body, encoding)."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class Request:
    def __init__(self, scope: Scope, receive: Receive, max_body_bytes: int) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        self._receive = receive
        self._limit = max_body_bytes

    def context(self) -> HttpCallContext:
        return HttpCallContext(
            [(key, self.headers[key]) for key in _METADATA_HEADERS if key in self.headers]
        )

    async def body(self) -> memoryview:
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._limit:
            raise _too_large(self._limit)
        received = bytearray()
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError  # nobody is left to answer
            received += message.get("body", b"")
            if len(received) > self._limit:
                raise _too_large(self._limit)
            if not message.get("more_body", False):
                break
        return memoryview(self._decoded(received))

    def _decoded(self, body: bytearray) -> bytes | bytearray:
        encoding = self.headers.get("content-encoding", "identity").strip().lower()
        if encoding == "identity":
            return body
        wbits = _DECOMPRESSORS.get(encoding)
        if wbits is None:
            raise HttpError(
                415, f"Content-Encoding '{encoding[:40]}' is not supported; use gzip or deflate"
            )
        decompressor = zlib.decompressobj(wbits)
        try:
            decoded = decompressor.decompress(body, self._limit + 1)
        except zlib.error as error:
            raise HttpError(400, f"the {encoding} body cannot be decompressed: {error}") from None
        if len(decoded) > self._limit:
            raise _too_large(self._limit)
        if not decompressor.eof:
            raise HttpError(400, f"the {encoding} body ends before its compressed stream does")
        return decoded


def _too_large(limit: int) -> HttpError:
    return HttpError(
        413, f"the request body is over the {limit} bytes this server accepts (--max-message-bytes)"
    )


class Response:
    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = [(b"content-type", content_type.encode())] if body else []
        self.headers += headers or []

    @classmethod
    def json(cls, document: Any, status: int = 200) -> Response:
        return cls(status, msgspec.json.encode(document))

    @classmethod
    def error(
        cls, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> Response:
        return cls(status, msgspec.json.encode({"error": message}), headers=headers)


Handler = Callable[[Request, dict[str, str]], Coroutine[Any, Any, Response]]
_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
_REGION = r"(?:/region/(?P<region>[^/]+))?"


class HttpApi:
    """The ASGI application: routes → RPCs."""

    def __init__(
        self, rpcs: dict[str, RpcImplementation], guard: TokenGuard, max_body_bytes: int
    ) -> None:
        self._rpcs = rpcs
        self._guard = guard
        self._max_body_bytes = max_body_bytes
        region = r"/region/(?P<region>[^/]+)"
        table: list[tuple[str, str, Handler]] = [
            ("GET", r"/v2/?", self._server_metadata),
            ("GET", r"/v2/health/live", self._live),
            ("GET", r"/v2/health/ready", self._ready),
            ("GET", r"/v2/models/stats", self._statistics),
            ("GET", _MODEL, self._model_metadata),
            ("GET", _MODEL + "/ready", self._model_ready),
            ("GET", _MODEL + "/config", self._model_config),
            ("GET", _MODEL + "/stats", self._statistics),
            ("POST", _MODEL + "/infer", self._infer),
            ("POST", r"/v2/repository/index", self._index),
            ("POST", r"/v2/repository/models/(?P<model>[^/]+)/load", self._load),
            ("POST", r"/v2/repository/models/(?P<model>[^/]+)/unload", self._unload),
            ("GET", r"/v2/systemsharedmemory" + _REGION + "/status", self._shm_status),
            ("POST", r"/v2/systemsharedmemory" + region + "/register", self._shm_register),
            ("POST", r"/v2/systemsharedmemory" + _REGION + "/unregister", self._shm_unregister),
            ("GET", r"/v2/cudasharedmemory" + _REGION + "/status", self._cuda_status),
            ("POST", r"/v2/cudasharedmemory" + region + "/register", self._cuda_register),
            ("POST", r"/v2/cudasharedmemory" + _REGION + "/unregister", self._cuda_unregister),
        ]
        by_pattern: dict[str, dict[str, Handler]] = {}
        for method, pattern, handler in table:
            by_pattern.setdefault(pattern, {})[method] = handler
        self._routes = [(re.compile(pattern), methods) for pattern, methods in by_pattern.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive, self._max_body_bytes)
        try:
            response = await self._dispatch(request)
        except HttpError as error:
            response = Response.error(error.status, error.message, error.headers)
        except (CallFailed, ServingError) as error:
            failed = error if isinstance(error, CallFailed) else CallFailed.from_error(error)
            headers = [(b"www-authenticate", b"Bearer")] if failed.http_status == 401 else []
            response = Response.error(failed.http_status, failed.message, headers)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path[:200])
            response = Response.error(500, INTERNAL_MESSAGE)
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (b"content-length", str(len(response.body)).encode()),
                    *response.headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": response.body})

    async def _dispatch(self, request: Request) -> Response:
        for pattern, handlers in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            handler = handlers.get(request.method)
            if handler is None:
                allowed = ", ".join(handlers)
                raise HttpError(
                    405,
                    f"{request.method[:10]} is not allowed on {request.path[:200]}; use {allowed}",
                    [(b"allow", allowed.encode())],
                )
            found = {key: value for key, value in match.groupdict().items() if value is not None}
            return await handler(request, found)
        raise HttpError(404, f"no such endpoint: {request.path[:200]}")

    async def _call(self, rpc: str, message: Any, request: Request, guarded: bool = True) -> Any:
        context = request.context()
        if guarded and self._guard.enabled:
            self._guard.check(rpc, context.invocation_metadata())
        return await self._rpcs[rpc](message, context)

    async def _document(self, request: Request, allow_empty: bool = True) -> dict[str, Any]:
        body = await request.body()
        if not body and allow_empty:
            return {}
        return decode_json_object("the request body", body)

    # ------------------------------------------------------------- health ---

    async def _live(self, request: Request, path: dict[str, str]) -> Response:
        answer = await self._call("ServerLive", pb.ServerLiveRequest(), request, guarded=False)
        return Response.json({"live": answer.live}, 200 if answer.live else 400)

    async def _ready(self, request: Request, path: dict[str, str]) -> Response:
        answer = await self._call("ServerReady", pb.ServerReadyRequest(), request, guarded=False)
        return Response.json({"ready": answer.ready}, 200 if answer.ready else 400)

    async def _model_ready(self, request: Request, path: dict[str, str]) -> Response:
        message = pb.ModelReadyRequest(name=path["model"], version=path.get("version", ""))
        answer = await self._call("ModelReady", message, request)
        document = {"name": path["model"], "ready": answer.ready}
        return Response.json(document, 200 if answer.ready else 400)

    # ----------------------------------------------------------- metadata ---

    async def _server_metadata(self, request: Request, path: dict[str, str]) -> Response:
        answer = await self._call("ServerMetadata", pb.ServerMetadataRequest(), request)
        return Response.json(message_to_json(answer))

    async def _model_metadata(self, request: Request, path: dict[str, str]) -> Response:
        message = pb.ModelMetadataRequest(name=path["model"], version=path.get("version", ""))
        return Response.json(message_to_json(await self._call("ModelMetadata", message, request)))

    async def _model_config(self, request: Request, path: dict[str, str]) -> Response:
        message = pb.ModelConfigRequest(name=path["model"], version=path.get("version", ""))
        answer = await self._call("ModelConfig", message, request)
        return Response.json(message_to_json(answer.config))

    async def _statistics(self, request: Request, path: dict[str, str]) -> Response:
        message = pb.ModelStatisticsRequest(
            name=path.get("model", ""), version=path.get("version", "")
        )
        answer = await self._call("ModelStatistics", message, request)
        return Response.json(message_to_json(answer))

    async def _index(self, request: Request, path: dict[str, str]) -> Response:
        document = await self._document(request)
        ready = document.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInputError("'ready' must be true or false")
        answer = await self._call(
            "RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), request
        )
        return Response.json([message_to_json(model) for model in answer.models])

    # ------------------------------------------------------ model control ---

    async def _load(self, request: Request, path: dict[str, str]) -> Response:
        message = pb.RepositoryModelLoadRequest(model_name=path["model"])
        self._copy_parameters(await self._document(request), message.parameters)
        await self._call("RepositoryModelLoad", message, request)
        return Response()

    async def _unload(self, request: Request, path: dict[str, str]) -> Response:
        message = pb.RepositoryModelUnloadRequest(model_name=path["model"])
        self._copy_parameters(await self._document(request), message.parameters)
        await self._call("RepositoryModelUnload", message, request)
        return Response()

    @staticmethod
    def _copy_parameters(document: dict[str, Any], target: Any) -> None:
        given = document.get("parameters", {})
        if not isinstance(given, dict):
            raise InvalidInputError("'parameters' must be a JSON object")
        for key, value in given.items():
            parameter_from_json(f"parameter '{key[:80]}'", value, target[key])

    # ------------------------------------------------------ shared memory ---

    async def _shm_status(self, request: Request, path: dict[str, str]) -> Response:
        message = pb.SystemSharedMemoryStatusRequest(name=path.get("region", ""))
        answer = await self._call("SystemSharedMemoryStatus", message, request)
        return Response.json([message_to_json(region) for region in answer.regions.values()])

    async def _shm_register(self, request: Request, path: dict[str, str]) -> Response:
        document = await self._document(request, allow_empty=False)
        key = document.get("key")
        offset = document.get("offset", 0)
        size = document.get("byte_size")
        if not isinstance(key, str):
            raise InvalidInputError("'key' must be the shared memory object's name, a string")
        for name, value in (("offset", offset), ("byte_size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
                raise InvalidInputError(f"'{name}' must be a non-negative integer")
        message = pb.SystemSharedMemoryRegisterRequest(
            name=path["region"], key=key, offset=offset, byte_size=size
        )
        await self._call("SystemSharedMemoryRegister", message, request)
        return Response()

    async def _shm_unregister(self, request: Request, path: dict[str, str]) -> Response:
        message = pb.SystemSharedMemoryUnregisterRequest(name=path.get("region", ""))
        await self._call("SystemSharedMemoryUnregister", message, request)
        return Response()

    async def _cuda_status(self, request: Request, path: dict[str, str]) -> Response:
        message = pb.CudaSharedMemoryStatusRequest(name=path.get("region", ""))
        answer = await self._call("CudaSharedMemoryStatus", message, request)
        return Response.json([message_to_json(region) for region in answer.regions.values()])

    async def _cuda_register(self, request: Request, path: dict[str, str]) -> Response:
        message = pb.CudaSharedMemoryRegisterRequest(name=path["region"])
        await self._call("CudaSharedMemoryRegister", message, request)
        return Response()

    async def _cuda_unregister(self, request: Request, path: dict[str, str]) -> Response:
        message = pb.CudaSharedMemoryUnregisterRequest(name=path.get("region", ""))
        await self._call("CudaSharedMemoryUnregister", message, request)
        return Response()

    # ---------------------------------------------------------- inference ---

    async def _infer(self, request: Request, path: dict[str, str]) -> Response:
        context = request.context()
        if self._guard.enabled:  # before the body is read or decoded
            self._guard.check("ModelInfer", context.invocation_metadata())
        body = await request.body()
        header_length = request.headers.get(HEADER_LENGTH)
        model, version = path["model"], path.get("version", "")
        json_bytes = len(body)
        if header_length is not None and header_length.isdigit():
            json_bytes = min(json_bytes, int(header_length))
        if json_bytes > _INLINE_JSON_BYTES:
            parsed = await asyncio.to_thread(
                parse_infer_request, model, version, body, header_length
            )
        else:
            parsed = parse_infer_request(model, version, body, header_length)
        answer = await self._rpcs["ModelInfer"](parsed.received, context)
        headers = [(key.encode(), value.encode()) for key, value in context.trailing]
        if json_output_bytes(answer, parsed) > _INLINE_JSON_BYTES:
            document, chunks = await asyncio.to_thread(encode_infer_response, answer, parsed)
        else:
            document, chunks = encode_infer_response(answer, parsed)
        header = msgspec.json.encode(document)
        if not chunks:
            return _compressed(request, Response(200, header, headers=headers))
        headers.append((HEADER_LENGTH.encode(), str(len(header)).encode()))
        body_out = b"".join((header, *chunks))
        return _compressed(
            request, Response(200, body_out, "application/octet-stream", headers=headers)
        )


def _compressed(request: Request, response: Response) -> Response:
    """gzip or deflate the answer when the client asks for it (Accept-Encoding)."""
    accepted = request.headers.get("accept-encoding", "")
    if not accepted or not response.body:
        return response
    for offered in accepted.split(","):
        encoding = offered.split(";")[0].strip().lower()
        wbits = _DECOMPRESSORS.get(encoding)
        if wbits is not None:
            compressor = zlib.compressobj(wbits=wbits)
            response.body = compressor.compress(response.body) + compressor.flush()
            response.headers.append((b"content-encoding", encoding.encode()))
            return response
    return response
