"""Assembling the grpc.aio server: inference service, health, reflection, limits."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..errors import StartupError
from ..protocol import POOL
from ..settings import Settings
from .servicer import SERVICE_NAME, InferenceServicer, rpc_handler

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def _register_health_descriptor() -> None:
    """Reflection answers from our private pool; teach it grpc.health.v1 too."""
    try:
        POOL.FindFileByName(health_pb2.DESCRIPTOR.name)
    except KeyError:
        POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)


def build_grpc_server(
    settings: Settings, servicer: InferenceServicer, health_servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """Create the server and bind its port; returns the server and the bound port."""
    limit = settings.max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((rpc_handler(servicer),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _register_health_descriptor()
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), server, pool=POOL
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        raise StartupError(f"cannot listen for gRPC on {address}: {error}") from None
    if port == 0:
        raise StartupError(f"cannot listen for gRPC on {address}")
    return server, port
