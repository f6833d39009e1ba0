"""Write the small example models of the embedded repository (models/repository).

`add_sub` is Triton's classic two-input example (OUTPUT0 = INPUT0 + INPUT1,
OUTPUT1 = INPUT0 - INPUT1 over FP32 [batch, 16]), built directly as an ONNX
graph: a model for trying clients and perf_analyzer against, with no training
involved. Run: python -m models.examples
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

REPOSITORY = Path(__file__).resolve().parent / "repository"
ADD_SUB_CONFIG = """\
# Triton's classic example, served with dynamic batching.
name: "add_sub"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] }
]
dynamic_batching { }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def add_sub() -> onnx.ModelProto:
    def tensors(*names: str) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 16]) for n in names]

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        tensors("INPUT0", "INPUT1"),
        tensors("OUTPUT0", "OUTPUT1"),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write(repository: Path = REPOSITORY) -> None:
    folder = repository / "add_sub"
    (folder / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(add_sub(), str(folder / "1" / "model.onnx"))
    (folder / "config.pbtxt").write_text(ADD_SUB_CONFIG)


if __name__ == "__main__":
    write()
