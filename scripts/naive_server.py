"""The obvious alternative to this project: gRPC's sync server, one session.run per call.

    python scripts/naive_server.py --model-repository DIR --port 0

What a user who needs Triton's protocol for a few ONNX models could write in an
afternoon instead of deploying a server: tritonclient's generated service,
`grpc.server` with 8 worker threads, one `InferenceSession` per model with
onnxruntime's default options, no batching, no metrics, no limits. It answers
what perf_analyzer and tritonclient call (metadata, config, infer) and prints
its port. ModelStatistics (not advertised, so perf_analyzer leaves it alone)
reports how long decoding, running and encoding took, for the benchmark's
accounting. The benchmark measures the project against it; it is never served.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as rpc

TYPES = {  # onnxruntime type -> (protocol datatype, numpy dtype)
    "tensor(float)": ("FP32", np.float32),
    "tensor(double)": ("FP64", np.float64),
    "tensor(int64)": ("INT64", np.int64),
    "tensor(int32)": ("INT32", np.int32),
    "tensor(uint8)": ("UINT8", np.uint8),
    "tensor(bool)": ("BOOL", np.bool_),
}

DATATYPES = {np.dtype(dtype): datatype for datatype, dtype in TYPES.values()}


class Model:
    def __init__(self, folder: Path) -> None:
        self.session = ort.InferenceSession(str(folder / "1" / "model.onnx"))
        self.config = mc.ModelConfig()
        if (folder / "config.pbtxt").exists():
            text_format.Parse((folder / "config.pbtxt").read_text(), self.config)
        self.config.name = folder.name
        self.dtypes = {arg.name: TYPES[arg.type][1] for arg in self.session.get_inputs()}
        self.lock = threading.Lock()
        self.phases = [0, 0, 0, 0]  # requests, then ns decoding, running, encoding

    def metadata(self) -> pb.ModelMetadataResponse:
        response = pb.ModelMetadataResponse(name=self.config.name, versions=["1"])
        for args, field in (
            (self.session.get_inputs(), response.inputs),
            (self.session.get_outputs(), response.outputs),
        ):
            for arg in args:
                shape = [d if isinstance(d, int) else -1 for d in arg.shape]
                field.add(name=arg.name, datatype=TYPES[arg.type][0], shape=shape)
        return response


class NaiveServicer(rpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, repository: Path) -> None:
        self.models = {f.name: Model(f) for f in sorted(repository.iterdir()) if f.is_dir()}

    def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self.models)

    def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="naive", version="1")

    def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        return self.models[request.name].metadata()

    def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.models[request.name].config)

    def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        model = self.models[request.name]
        with model.lock:
            count, decode, run, encode = model.phases
        stats = pb.ModelStatistics(
            name=request.name, version="1", inference_count=count, execution_count=count
        )
        for field, ns in (
            ("success", decode + run + encode),
            ("compute_input", decode),
            ("compute_infer", run),
            ("compute_output", encode),
        ):
            getattr(stats.inference_stats, field).MergeFrom(
                pb.StatisticDuration(count=count, ns=ns)
            )
        return pb.ModelStatisticsResponse(model_stats=[stats])

    def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        started = time.perf_counter_ns()
        model = self.models[request.model_name]
        feeds = {
            tensor.name: np.frombuffer(raw, model.dtypes[tensor.name]).reshape(tensor.shape)
            for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        names = [output.name for output in model.session.get_outputs()]
        decoded = time.perf_counter_ns()
        results = model.session.run(names, feeds)
        ran = time.perf_counter_ns()
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        for name, array in zip(names, results, strict=True):
            response.outputs.add(name=name, datatype=DATATYPES[array.dtype], shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        encoded = time.perf_counter_ns()
        with model.lock:
            for index, ns in enumerate((1, decoded - started, ran - decoded, encoded - ran)):
                model.phases[index] += ns
        return response


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    limit = 2**31 - 1
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    rpc.add_GRPCInferenceServiceServicer_to_server(NaiveServicer(options.model_repository), server)
    port = server.add_insecure_port(f"127.0.0.1:{options.port}")
    server.start()
    print(f"naive server listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
