"""Assembling the grpc.aio server: inference service, health, reflection, limits."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from ..errors import StartupError
from ..protocol import POOL
from ..settings import Settings
from .auth import TokenGuard
from .servicer import SERVICE_NAME, RpcImplementation, rpc_handler

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _register_reflection_v1_descriptor() -> None:
    """Reflection describes itself in both versions: v1alpha's file as the package ships
    it, and v1's, which is v1alpha's under another package (same messages, same field
    numbers)."""
    try:
        POOL.FindFileByName(_REFLECTION_V1_FILE)
        return
    except KeyError:
        pass
    POOL.AddSerializedFile(reflection_pb2.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    old, new = f".{file.package}.", ".grpc.reflection.v1."
    file.name = _REFLECTION_V1_FILE
    file.package = new.strip(".")
    file.options.Clear()
    for message in file.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old) :]
    for service in file.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    POOL.Add(file)


_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _enable_reflection(server: grpc.aio.Server, names: Sequence[str]) -> None:
    """Serve reflection as v1alpha (grpcurl, older clients) and v1 (newer ones): one
    servicer, the v1 method reading and writing v1alpha's identical messages."""
    _register_reflection_v1_descriptor()
    listed = (*names, reflection.SERVICE_NAME, REFLECTION_V1)
    reflection.enable_server_reflection(listed, server, pool=POOL)
    servicer = reflection.aio.ReflectionServicer(listed, pool=POOL)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


def _register_health_descriptor() -> None:
    """Reflection answers from our private pool; teach it grpc.health.v1 too."""
    try:
        POOL.FindFileByName(health_pb2.DESCRIPTOR.name)
    except KeyError:
        POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise StartupError(f"cannot read the {what} {path}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise StartupError(f"the {what} {path} is not PEM (no '-----BEGIN' line)")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings, or None for plaintext.

    With a client CA, a client certificate signed by it is required (mutual
    TLS); gRPC then refuses the handshake of any client without one.
    """
    if settings.grpc_tls_cert is None or settings.grpc_tls_key is None:
        return None
    chain = _read_pem(settings.grpc_tls_cert, "TLS certificate")
    key = _read_pem(settings.grpc_tls_key, "TLS private key")
    # gRPC would only fail at the first handshake; say at start-up what is wrong.
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            settings.grpc_tls_cert, settings.grpc_tls_key
        )
    except ssl.SSLError as error:
        raise StartupError(
            f"the TLS certificate {settings.grpc_tls_cert} and key {settings.grpc_tls_key} "
            f"cannot be used together: {error.reason or error}"
        ) from None
    client_ca = None
    if settings.grpc_tls_client_ca is not None:
        client_ca = _read_pem(settings.grpc_tls_client_ca, "client CA bundle")
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def build_grpc_server(
    settings: Settings,
    rpcs: dict[str, RpcImplementation],
    health_servicer: health.aio.HealthServicer,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """Create the server and bind its port; returns the server and the bound port.

    `reuse_port`: front-end processes share one port (SO_REUSEPORT); the kernel
    spreads connections across them.
    """
    limit = settings.max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # Calls gRPC accepted that the server has not yet taken from it wait here,
            # unseen by the server's own limits; bound them (soft = hard: no random drops).
            ("grpc.server.max_pending_requests", settings.grpc_max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", settings.grpc_max_pending_calls),
        ]
    )
    guard = TokenGuard(settings.auth_token, settings.admin_token)
    server.add_generic_rpc_handlers((rpc_handler(rpcs, guard),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _register_health_descriptor()
    _enable_reflection(server, (SERVICE_NAME, HEALTH_SERVICE))
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    credentials = server_credentials(settings)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise StartupError(f"cannot listen for gRPC on {address}: {error}") from None
    if port == 0:
        raise StartupError(f"cannot listen for gRPC on {address}")
    return server, port
