"""The server with its inference work taken out: what gRPC Python alone allows.

    python scripts/grpc_ceiling.py serve --model-repository DIR ...   # same flags as batchwise

Each model's first ModelInfer goes through the real path; every later request
with the same model and input shapes is answered with a copy of that response,
so what remains per request is grpc.aio, protobuf parsing of the request and
serialising a response of the real size: no decoding, batching, onnxruntime or
statistics. The benchmarks run it beside the real server to show how much of
the gap to in-process onnxruntime is the transport, which no batching can win
back. A measuring tool, never a server to deploy: the cache ignores requested
outputs and parameters, and the server-side limits and access log that run
before decoding are skipped too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.grpc_api.infer import InferenceCalls
from service.grpc_api.wire import ReceivedInferRequest
from service.protocol import grpc_service_pb2 as pb

_real_model_infer = InferenceCalls.ModelInfer
_answers: dict[tuple[str, str, tuple[tuple[int, ...], ...]], pb.ModelInferResponse] = {}


async def _answer_from_cache(
    self: InferenceCalls, request: ReceivedInferRequest, context: Any
) -> pb.ModelInferResponse:
    message = request.message
    key = (
        message.model_name,
        message.model_version,
        tuple(tuple(tensor.shape) for tensor in message.inputs),
    )
    cached = _answers.get(key)
    if cached is None:
        cached = await _real_model_infer(self, request, context)
        _answers[key] = cached
    response = pb.ModelInferResponse()
    response.CopyFrom(cached)
    response.id = message.id
    return response


def main() -> int:
    from service.cli import main as serve

    InferenceCalls.ModelInfer = _answer_from_cache  # type: ignore[method-assign]
    return serve()


if __name__ == "__main__":
    raise SystemExit(main())
