"""What each step of a request costs on this machine, in microseconds, measured in-process.

    python scripts/step_costs.py                       # the 1x28x28 CNN of the benchmark
    python scripts/step_costs.py --model resnet18
    BATCHWISE_TREE=../before python scripts/step_costs.py   # another checkout's service

Each step of the path a ModelInfer request takes through this server is timed
on its own, many times over, with a real request for the model (built the
way tritonclient builds it) and the real objects the server uses, then the
whole path on the event loop without gRPC (`version.infer` and the encoding
around it: the work one request costs the loop). gRPC's own per-call cost
is not here: grpc_ceiling.py and the benchmark measure it through the wire.
The benchmark's per-request accounting shows the same phases under load.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("BATCHWISE_TREE", str(ROOT)))

from bench_clients import feeds  # noqa: E402
from bench_models import MODELS, prepare_sources, write_repositories  # noqa: E402

from service.grpc_api.codec import decode_infer_request, encode_infer_response  # noqa: E402
from service.grpc_api.wire import receive_infer_request  # noqa: E402
from service.inference import InferenceRequest, RequestBuilder  # noqa: E402
from service.logs import new_request_id  # noqa: E402
from service.protocol import grpc_service_pb2 as pb  # noqa: E402
from service.repository import ModelRegistry  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.statistics import RequestTimings  # noqa: E402

try:
    from service.shared_memory import SharedMemoryRegions
except ImportError:
    REGIONS = None
else:
    REGIONS = SharedMemoryRegions(enabled=False, max_tensor_bytes=2**31 - 1)


def timed(label: str, step: Callable[[], object], seconds: float) -> float:
    """Microseconds per call: the median of five batches of calls."""
    step()
    calls = 1
    while True:  # calls per batch so that a batch takes ~seconds/5
        started = time.perf_counter()
        for _ in range(calls):
            step()
        if time.perf_counter() - started > seconds / 25 or calls > 1 << 20:
            break
        calls *= 2
    batches = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            step()
        batches.append((time.perf_counter() - started) / calls * 1e6)
    value = float(np.median(batches))
    print(f"  {label:<52}{value:>10.2f} µs")
    return value


def request_bytes(model: str) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    for name, array in feeds(MODELS[model].inputs, 1).items():
        request.inputs.add(
            name=name,
            datatype="FP32" if array.dtype == np.float32 else "INT64",
            shape=list(array.shape),
        )
        request.raw_input_contents.append(array.tobytes())
    return request.SerializeToString()


async def hand_off_round_trip(seconds: float) -> float:
    """A thread woken from a lock and back to the loop through call_soon_threadsafe."""

    async def measure() -> float:
        loop = asyncio.get_running_loop()
        wake = threading.Lock()
        wake.acquire()
        box: list[asyncio.Future[None]] = []

        def worker() -> None:
            while True:
                wake.acquire()
                loop.call_soon_threadsafe(box.pop().set_result, None)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            future = loop.create_future()
            box.append(future)
            wake.release()
            await future
            count += 1
        return (time.perf_counter() - started) / count * 1e6

    value = await measure()
    print(f"  {'hand-off to a thread and back (lock, call_soon_threadsafe)':<52}{value:>10.2f} µs")
    return value


async def call_bookkeeping(seconds: float) -> None:
    """What a call's own bookkeeping costs, inside a real grpc.aio handler."""
    import grpc

    try:
        from service.grpc_api.infer import _access_log, _request_id
    except ImportError:  # checkouts before the inference RPCs had their own module
        from service.grpc_api.servicer import (  # type: ignore[attr-defined,no-redef]
            _access_log,
            _request_id,
        )
    from service.logs import REQUEST_ID

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        message = pb.ModelInferRequest(model_name="m")
        timed("x-request-id: read the call's metadata", lambda: _request_id(context), seconds)
        timed(
            "x-request-id: set as trailing metadata",
            lambda: context.set_trailing_metadata((("x-request-id", "0123456789abcdef"),)),
            seconds,
        )
        timed("request id in the log context (contextvar)", lambda: REQUEST_ID.set("abc"), seconds)
        timed("deadline: context.time_remaining()", context.time_remaining, seconds)
        timed("access log, off: the check", lambda: _access_log(message, "OK", 0), seconds)
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "steps.Steps", {"Call": grpc.unary_unary_rpc_method_handler(handler)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.unary_unary("/steps.Steps/Call")(b"", metadata=(("x-request-id", "q"),))
    await server.stop(0)


async def steps(model: str, seconds: float) -> None:
    repository, _ = write_repositories([model])
    registry = ModelRegistry(Settings(model_repository=repository, warmup="off"))
    await registry.load_all([model])
    version = registry.resolve(model, "")
    data = request_bytes(model)
    received = receive_infer_request(data)
    print(f"{model}: one request of one row ({len(data):,} bytes)")

    def decode() -> InferenceRequest:
        builder = RequestBuilder(
            version.signature, version.label, version.text_encoder, registry.max_request_elements
        )
        if REGIONS is None:  # checkouts before the shared-memory extension
            old_decode: Any = decode_infer_request
            return old_decode(received, builder, time.perf_counter_ns())  # type: ignore[no-any-return]
        core, _ = decode_infer_request(received, builder, time.perf_counter_ns(), REGIONS)
        return core

    core = decode()
    session = version.runner.thread_session()
    model_feeds = {name: np.ascontiguousarray(a) for name, a in core.inputs.items()}
    outputs = list(core.outputs)
    result, _ = await version.scheduler.infer(core)
    timed("receive: parse the ModelInferRequest", lambda: receive_infer_request(data), seconds)
    timed("resolve the model version", lambda: registry.resolve(model, ""), seconds)

    def enter_leave() -> None:
        version.enter()
        version.leave()

    timed("version enter/leave (unload waits for it)", enter_leave, seconds)
    await call_bookkeeping(seconds)
    timed("request id (generated)", new_request_id, seconds)
    timed("decode and validate the inputs", decode, seconds)

    def request_accounting() -> None:
        version.stats.request_started()
        version.stats.record_success(1, 1000, RequestTimings())

    timed("statistics: one request started and succeeded", request_accounting, seconds)
    timed(
        "statistics: one execution",
        lambda: version.stats.record_execution(1, RequestTimings(), 1, 0),
        seconds,
    )
    timed("onnxruntime: session.run, one row", lambda: session.run(model_feeds, outputs), seconds)
    timed(
        "execute: merge, run, split and encode one row",
        lambda: version.runner.execute([core], RequestTimings()),
        seconds,
    )
    timed(
        "encode the ModelInferResponse",
        lambda: encode_infer_response(model, 1, "", result),
        seconds,
    )
    timed(
        "serialize the ModelInferResponse",
        encode_infer_response(model, 1, "", result).SerializeToString,
        seconds,
    )
    await hand_off_round_trip(seconds)

    loop = asyncio.get_running_loop()

    lanes = len(inspect.signature(version.infer).parameters) > 1  # checkouts before lone runs

    async def whole(alone: bool) -> None:
        request = decode()
        answer = await (version.infer(request, alone) if lanes else version.infer(request))
        encode_infer_response(model, 1, "", answer)

    runs = ((True, "on the loop (a lone request)"), (False, "through an instance"))
    for alone, label in runs if lanes else runs[1:]:
        await whole(alone)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            await whole(alone)
            count += 1
        value = (time.perf_counter() - started) / count * 1e6
        print(f"  {'whole path, ' + label:<52}{value:>10.2f} µs")
    del loop
    registry.close()
    registry.join(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist_cnn", choices=["mnist_cnn", "resnet18", "minilm"])
    parser.add_argument("--seconds", type=float, default=1.0, help="per step")
    options = parser.parse_args()
    prepare_sources([options.model])
    asyncio.run(steps(options.model, options.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
