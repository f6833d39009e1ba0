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


def _busy_loop(steps_input: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes that spin for max(steps) iterations of a small matvec; their result is ×0.

    Lets a test hold a model instance busy for as long as it likes without the
    output depending on it: y stays exactly what the rest of the graph computes.
    """
    width = 64
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "busy_w"], ["h_mul"]),
            helper.make_node("Tanh", ["h_mul"], ["h_out"]),
        ],
        "busy_body",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, width]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, width]),
        ],
    )
    nodes = [
        helper.make_node("ReduceMax", [steps_input], ["busy_trips"], keepdims=0),
        helper.make_node("Loop", ["busy_trips", "busy_true", "busy_h0"], ["busy_h"], body=body),
        helper.make_node("ReduceSum", ["busy_h"], ["busy_sum"], keepdims=0),
        helper.make_node("Mul", ["busy_sum", "busy_zero"], ["busy_nothing"]),
    ]
    initializers = [
        numpy_helper.from_array(weight, "busy_w"),
        numpy_helper.from_array(np.array(True), "busy_true"),
        numpy_helper.from_array(np.full((1, width), 0.5, np.float32), "busy_h0"),
        numpy_helper.from_array(np.array(0.0, np.float32), "busy_zero"),
    ]
    return nodes, initializers


def sleepy_double(width: int = 4) -> onnx.ModelProto:
    """y = 2x; `steps` [batch, 1] INT64 keeps the instance busy for max(steps) loop trips."""
    busy, initializers = _busy_loop("steps")
    nodes = [
        *busy,
        helper.make_node("Mul", ["x", "two"], ["doubled"]),
        helper.make_node("Add", ["doubled", "busy_nothing"], ["y"]),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("steps", TensorProto.INT64, ["batch", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [*initializers, numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )


def sleepy_tokens() -> onnx.ModelProto:
    """Per-token and pooled outputs of variable-length inputs with a mask (paddable).

    doubled = 2 * tokens ([batch, seq]); mean = sum(tokens * mask) / sum(mask) ([batch, 1]);
    `steps` keeps the instance busy as in sleepy_double.
    """
    busy, initializers = _busy_loop("steps")
    nodes = [
        *busy,
        helper.make_node("Mul", ["tokens", "two"], ["twice"]),
        helper.make_node("Add", ["twice", "busy_nothing"], ["doubled"]),
        helper.make_node("Mul", ["tokens", "mask"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=1),
        helper.make_node("ReduceSum", ["mask", "axis1"], ["count"], keepdims=1),
        helper.make_node("Div", ["total", "count"], ["mean"]),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "seq"]),
            helper.make_tensor_value_info("steps", TensorProto.INT64, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["batch", "seq"]),
            helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", 1]),
        ],
        [
            *initializers,
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ],
    )


def sleepy_gather(rows: int = 10, width: int = 4) -> onnx.ModelProto:
    """emb = table[ids] ([batch, 2] ids -> [batch, 2, width]); ids >= rows make onnxruntime fail."""
    busy, initializers = _busy_loop("steps")
    table = np.arange(rows * width, dtype=np.float32).reshape(rows, width)
    nodes = [
        *busy,
        helper.make_node("Gather", ["table", "ids"], ["gathered"]),
        helper.make_node("Add", ["gathered", "busy_nothing"], ["emb"]),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2]),
            helper.make_tensor_value_info("steps", TensorProto.INT64, ["batch", 1]),
        ],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", 2, width])],
        [*initializers, numpy_helper.from_array(table, "table")],
    )


def untied_tokens() -> onnx.ModelProto:
    """tokens [batch, seq] -> copy [batch, out_seq]: the graph does not tie the two dims."""
    return _model(
        [helper.make_node("Identity", ["tokens"], ["copy"])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("copy", TensorProto.FLOAT, ["batch", "out_seq"])],
    )
