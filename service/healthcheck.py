"""`batchwise health`: a grpc.health.v1 probe for container health checks.

Docker's HEALTHCHECK and compose's `service_healthy` run a command inside the
container; images have no grpcurl or grpc_health_probe, so the server ships its
own probe. It asks the same health service Kubernetes' native gRPC probes ask,
so every orchestrator sees one answer.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def probe(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """Ask `address` whether `service` ("" = the whole server, or a model name) serves.

    Returns (serving, a one-line description) and never raises for network or
    status errors: a probe must answer "unhealthy", not crash.
    """
    target = f"{address} ({service})" if service else address
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            return False, f"{target}: {name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == SERVING, f"{target}: {status}"
