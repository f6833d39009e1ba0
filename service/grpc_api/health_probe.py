"""`batchwise health`: a grpc.health.v1 probe for container health checks.

Docker's HEALTHCHECK and compose's `service_healthy` run a command inside the
container; images have no grpcurl or grpc_health_probe, so the server ships its
own probe. It asks the same health service Kubernetes' native gRPC probes ask,
so every orchestrator sees one answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class ProbeTls:
    """How the probe speaks TLS: the CA that signed the server, and a client pair for mTLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


def _channel(address: str, tls: ProbeTls | None) -> grpc.Channel:
    # A proxy from the environment (Docker can inject one) must not carry a local probe.
    options: list[tuple[str, object]] = [("grpc.enable_http_proxy", 0)]
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, tls.credentials(), options=options)


def probe(
    address: str, service: str = "", timeout: float = 3.0, tls: ProbeTls | None = None
) -> tuple[bool, str]:
    """Ask `address` whether `service` ("" = the whole server, or a model name) serves.

    Returns (serving, a one-line description) and never raises for network or
    status errors: a probe must answer "unhealthy", not crash.
    """
    target = f"{address} ({service})" if service else address
    with _channel(address, tls) as channel:
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
