"""The one error hierarchy of the service.

Every failure a client can cause or observe is a `ServingError` subclass whose
`status` names the protocol status it maps to. The core raises these and never
imports grpc; the grpc layer maps `status` to a gRPC code in one place
(`service.grpc_api.errors`). Anything that is not a `ServingError` is a bug and
reaches the client as INTERNAL with a generic message.
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """Protocol-neutral status names; the grpc layer maps them to grpc.StatusCode."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    UNAVAILABLE = "UNAVAILABLE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


class ServingError(Exception):
    """An error with a message fit for the client and a protocol status."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(ServingError):
    """The request is malformed or does not match the model's signature."""

    status = Status.INVALID_ARGUMENT


class ModelNotFoundError(ServingError):
    """No such model, or no such version of it, in the repository."""

    status = Status.NOT_FOUND


class NotFoundError(ServingError):
    """Something the client names by its own choosing (a shared memory region) is unknown."""

    status = Status.NOT_FOUND


class AlreadyExistsError(ServingError):
    """The client asked to create something under a name already in use."""

    status = Status.ALREADY_EXISTS


class ModelNotReadyError(ServingError):
    """The model exists but cannot serve now (failed to load, loading, unloading)."""

    status = Status.UNAVAILABLE


class UnsupportedError(ServingError):
    """A protocol feature this server does not implement."""

    status = Status.UNIMPLEMENTED


class ServerUnavailableError(ServingError):
    """The server is not accepting work (starting up, shutting down, overloaded)."""

    status = Status.UNAVAILABLE


class DeadlineExceededError(ServingError):
    """The request's gRPC deadline passed before it could run."""

    status = Status.DEADLINE_EXCEEDED


class ModelExecutionError(ServingError):
    """onnxruntime failed on a request that passed validation."""

    status = Status.INTERNAL


class RequestTooLargeError(ServingError):
    """The request is above a configured size limit (elements, bytes)."""

    status = Status.RESOURCE_EXHAUSTED


class UnauthenticatedError(ServingError):
    """The call carries no valid bearer token."""

    status = Status.UNAUTHENTICATED


class PermissionDeniedError(ServingError):
    """The token is valid, but not for this kind of call (an inference token on load/unload)."""

    status = Status.PERMISSION_DENIED


class FailedPreconditionError(ServingError):
    """The call is valid but not in the server's current configuration (e.g. model control off)."""

    status = Status.FAILED_PRECONDITION


class ModelLoadFailedError(ServingError):
    """RepositoryModelLoad could not load the model; what served before still serves."""

    status = Status.FAILED_PRECONDITION


class FatalRuntimeError(ServingError):
    """The runtime failed in a way this process cannot recover from; the server exits.

    UNAVAILABLE, not INTERNAL: the request did nothing wrong and another
    replica (or this one, restarted) can serve it.
    """

    status = Status.UNAVAILABLE


class ModelLoadError(Exception):
    """A model or version could not be loaded; the message is the reason shown to users.

    Not a ServingError: load failures are reported through readiness and the
    repository index, not as the status of the request that observes them.
    """


class StartupError(Exception):
    """The server cannot start (bad repository path, port in use); the process exits 1."""
