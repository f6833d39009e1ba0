"""An HTTP request as a call of the gRPC service's implementations.

Each HTTP route names one RPC; the implementation that answers gRPC answers it
too, through a context that carries the HTTP headers as call metadata (bearer
token, x-request-id) and turns an abort into an exception. So HTTP and gRPC
share one set of rules: validation, admission, batching, statistics,
auth, and the statuses they answer with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from ..errors import ServingError, Status
from ..grpc_api.errors import GRPC_CODES

# The HTTP status Triton answers for each outcome; statuses Triton has no case for
# follow HTTP's own meaning.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.ALREADY_EXISTS: 400,
    grpc.StatusCode.CANCELLED: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.ABORTED: 409,
}


class CallFailed(grpc.aio.AbortError):  # type: ignore[misc]
    """An implementation aborted the call; `translate_errors` lets it through as it does
    gRPC's own AbortError."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    @classmethod
    def from_error(cls, error: ServingError) -> CallFailed:
        return cls(GRPC_CODES[error.status], error.message)


class HttpCallContext:
    """What the implementations use of grpc.aio.ServicerContext."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)
        self.trailing: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.trailing = tuple(metadata)

    def time_remaining(self) -> float | None:
        """HTTP carries no deadline: a request's own 'timeout' parameter bounds its wait."""
        return None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> Any:
        raise CallFailed(code, details)


def unavailable(message: str) -> CallFailed:
    return CallFailed(GRPC_CODES[Status.UNAVAILABLE], message)
