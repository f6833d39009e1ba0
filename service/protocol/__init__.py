"""Protocol messages generated from proto/ (see scripts/generate_protocol.py)."""

from . import grpc_service_pb2, model_config_pb2
from ._pool import POOL

__all__ = ["POOL", "grpc_service_pb2", "model_config_pb2"]
