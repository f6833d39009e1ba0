"""Small real ONNX models that the tests build for themselves with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

# Every element type the protocol knows, with its ONNX type and a numpy carrier.
ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BF16": TensorProto.BFLOAT16,
    "BYTES": TensorProto.STRING,
}


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "graph", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def save(
    model: onnx.ModelProto, repository: Path, name: str, version: int = 1, config: str | None = None
) -> Path:
    folder = repository / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    if config is not None:
        (repository / name / "config.pbtxt").write_text(config)
    return folder / "model.onnx"


def add_sub(
    width: int = 16, elem: int = TensorProto.FLOAT, batch: str | int = "batch"
) -> onnx.ModelProto:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (Triton's classic example)."""
    shape = [batch, width]
    return _model(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        [
            helper.make_tensor_value_info("INPUT0", elem, shape),
            helper.make_tensor_value_info("INPUT1", elem, shape),
        ],
        [
            helper.make_tensor_value_info("OUTPUT0", elem, shape),
            helper.make_tensor_value_info("OUTPUT1", elem, shape),
        ],
    )


def identity(datatypes: list[str]) -> onnx.ModelProto:
    """IN_<T> -> OUT_<T> unchanged, for each type, shape [batch, n]."""
    nodes, inputs, outputs = [], [], []
    for name in datatypes:
        elem = ONNX_TYPES[name]
        inputs.append(helper.make_tensor_value_info(f"IN_{name}", elem, ["batch", f"n_{name}"]))
        outputs.append(helper.make_tensor_value_info(f"OUT_{name}", elem, ["batch", f"n_{name}"]))
        nodes.append(helper.make_node("Identity", [f"IN_{name}"], [f"OUT_{name}"]))
    return _model(nodes, inputs, outputs)


def scale(factor: float, shape: list[int | str]) -> onnx.ModelProto:
    """y = x * factor; a fixed or dynamic shape as given."""
    return _model(
        [helper.make_node("Mul", ["x", "factor"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor")],
    )


def slow_matmul(width: int = 256, depth: int = 48) -> onnx.ModelProto:
    """A chain of `depth` MatMuls: slow enough per row to keep a request in flight."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes = []
    previous = "x"
    for index in range(depth):
        current = f"h{index}" if index < depth - 1 else "y"
        nodes.append(helper.make_node("MatMul", [previous, "w"], [current]))
        previous = current
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(weight, "w")],
    )


def tied_add(width: str | int = "n") -> onnx.ModelProto:
    """c = a + b where the graph ties both inputs' second dimension to one symbol."""
    shape = ["batch", width]
    return _model(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, shape),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, shape)],
    )


def vector_sum() -> onnx.ModelProto:
    """ids: INT64 [batch] -> total: INT64 [batch] (ids + 1): tensors with no dims but batch."""
    return _model(
        [helper.make_node("Add", ["ids", "one"], ["total"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("total", TensorProto.INT64, ["batch"])],
        [numpy_helper.from_array(np.array(1, dtype=np.int64), "one")],
    )


def fixed_reshape(target: int = 3) -> onnx.ModelProto:
    """Reshapes x [batch, n] to [batch, target]: onnxruntime fails unless n == target."""
    return _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", target])],
        [numpy_helper.from_array(np.array([-1, target], dtype=np.int64), "shape")],
    )
