"""onnxruntime sessions: placement, session options from config, and execution.

This is the only module that imports onnxruntime. Sessions are created once
per model version and run from worker threads: onnxruntime releases the GIL
inside `run()` and allows concurrent runs on one session, so one session serves
every instance of a model version.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import fatal
from .errors import FatalRuntimeError, InvalidInputError, ModelExecutionError, ModelLoadError
from .model_config import GraphSignature, GraphTensor, ModelConfigError
from .protocol import model_config_pb2 as mc

log = logging.getLogger(__name__)

try:
    import onnxruntime as ort
except ImportError as missing:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "onnxruntime is not installed: install the package with the 'cpu' extra "
        "(pip install 'batchwise[cpu]') or the 'gpu' extra (pip install 'batchwise[gpu]')"
    ) from missing

from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state  # noqa: E402

# Raised by onnxruntime's checks of the feeds (names, types, ranks, fixed dims).
_ORT_INPUT_ERRORS = (_ort_state.InvalidArgument,)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# Triton's onnxruntime backend numbers graph optimization levels this way.
_GRAPH_LEVELS = {
    0: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_INT_PARAMETERS = ("intra_op_thread_count", "inter_op_thread_count", "execution_mode")
_BOOL_PARAMETERS = ("enable_mem_arena", "enable_mem_pattern", "allow_spinning")


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def runtime_version() -> str:
    return str(ort.__version__)


@dataclass(frozen=True)
class Placement:
    """Where a model version's instances run and how many run at once."""

    providers: tuple[Any, ...]
    device: str
    instance_count: int


def plan_placement(config: mc.ModelConfig, available: Sequence[str]) -> Placement:
    """Choose execution providers from instance_group, failing clearly where impossible."""
    kinds = {group.kind for group in config.instance_group}
    if len(kinds) > 1:
        raise ModelConfigError("instance groups of different kinds in one model are not supported")
    kind = kinds.pop() if kinds else mc.ModelInstanceGroup.KIND_AUTO
    count = sum(group.count for group in config.instance_group) or 1
    gpus = [gpu for group in config.instance_group for gpu in group.gpus]
    if kind == mc.ModelInstanceGroup.KIND_CPU:
        return Placement((CPU,), "CPU", count)
    if CUDA in available:
        device_id = gpus[0] if gpus else 0
        return Placement(((CUDA, {"device_id": device_id}), CPU), f"GPU {device_id}", count)
    if kind == mc.ModelInstanceGroup.KIND_GPU:
        raise ModelLoadError(
            "instance_group asks for KIND_GPU but onnxruntime offers only "
            f"[{', '.join(available)}]; install the 'gpu' extra on a machine with an NVIDIA GPU, "
            "or set kind: KIND_CPU"
        )
    return Placement((CPU,), "CPU", count)


def _parameter(config: mc.ModelConfig, key: str) -> str | None:
    if key in config.parameters:
        return config.parameters[key].string_value.strip()
    return None


def session_options(
    config: mc.ModelConfig, model_dir: Path, spinning: bool = False
) -> ort.SessionOptions:
    """SessionOptions from Triton's onnxruntime parameters and optimization settings.

    `spinning` (server setting, overridden by the model parameter `allow_spinning`)
    decides whether onnxruntime's worker threads busy-wait between operators.
    Spinning shaves microseconds off a run measured alone, but in a server the
    spinning threads take the cores the gRPC event loop and the clients need.
    """
    options = ort.SessionOptions()
    # Fatal only: errors reach us as exceptions and are logged with the request's id.
    options.log_severity_level = 4
    values: dict[str, int] = {}
    for key in (*_INT_PARAMETERS, *_BOOL_PARAMETERS):
        text = _parameter(config, key)
        if text is None:
            continue
        if key in _BOOL_PARAMETERS and text.lower() in ("true", "false"):
            text = "1" if text.lower() == "true" else "0"
        try:
            values[key] = int(text)
        except ValueError:
            raise ModelConfigError(f"parameter '{key}' is '{text}'; expected an integer") from None
        if values[key] < 0:
            raise ModelConfigError(f"parameter '{key}' is {values[key]}; expected ≥ 0")
    if "intra_op_thread_count" in values:
        options.intra_op_num_threads = values["intra_op_thread_count"]
    if "inter_op_thread_count" in values:
        options.inter_op_num_threads = values["inter_op_thread_count"]
    if "execution_mode" in values:
        if values["execution_mode"] not in (0, 1):
            raise ModelConfigError(
                "parameter 'execution_mode' must be 0 (sequential) or 1 (parallel)"
            )
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL
            if values["execution_mode"]
            else ort.ExecutionMode.ORT_SEQUENTIAL
        )
    if "enable_mem_arena" in values:
        options.enable_cpu_mem_arena = bool(values["enable_mem_arena"])
    if "enable_mem_pattern" in values:
        options.enable_mem_pattern = bool(values["enable_mem_pattern"])
    spin = "1" if values.get("allow_spinning", int(spinning)) else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    level = config.optimization.graph.level
    if level not in _GRAPH_LEVELS:
        raise ModelConfigError(
            f"optimization.graph.level is {level}; expected -1 (basic), 0 (all, default), "
            "1 (extended) or 2 (disabled)"
        )
    options.graph_optimization_level = _GRAPH_LEVELS[level]
    for library in config.model_operations.op_library_filename:
        path = (model_dir / library).resolve()
        if not path.is_relative_to(model_dir.resolve()):
            raise ModelConfigError(
                f"model_operations library '{library}' is outside the model folder; custom "
                "operator libraries must live inside it"
            )
        if not path.is_file():
            raise ModelConfigError(f"model_operations library '{library}' was not found")
        try:
            options.register_custom_ops_library(str(path))
        except Exception as error:  # onnxruntime raises its own RuntimeException type
            raise ModelConfigError(
                f"model_operations library '{library}' could not be loaded: {_first_line(error)}"
            ) from None
    return options


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_SOURCE_LOCATION = re.compile(r"\S*onnxruntime_src\S*\s*")


def _first_line(error: BaseException) -> str:
    """The useful part of an onnxruntime message, without its source-file locations."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    text = _SOURCE_LOCATION.sub("", _ORT_PREFIX.sub("", text))
    return text[:300]


def _graph_tensor(arg: Any) -> GraphTensor:
    shape = arg.shape if isinstance(arg.shape, (list, tuple)) else []
    dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
    symbols = tuple(d if isinstance(d, str) and d else None for d in shape)
    return GraphTensor(arg.name, str(arg.type), dims, symbols)


class OnnxSession:
    """One onnxruntime session and the knowledge of how to feed it."""

    def __init__(self, model_path: Path, options: ort.SessionOptions, placement: Placement) -> None:
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=list(placement.providers)
            )
        except Exception as error:  # onnxruntime raises several unrelated types here
            first_line = (
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            )
            raise ModelLoadError(
                f"onnxruntime could not load {model_path.name}: {first_line}"
            ) from None
        self.graph = GraphSignature(
            inputs=tuple(_graph_tensor(arg) for arg in self._session.get_inputs()),
            outputs=tuple(_graph_tensor(arg) for arg in self._session.get_outputs()),
            overridable=tuple(
                _graph_tensor(arg) for arg in self._session.get_overridable_initializers()
            ),
        )
        self.provider = self._session.get_providers()[0]
        self.device = placement.device
        all_tensors = (*self.graph.inputs, *self.graph.outputs, *self.graph.overridable)
        self._bf16 = {t.name for t in all_tensors if t.ort_type == "tensor(bfloat16)"}
        if self._bf16 and any(t.ort_type == "tensor(string)" for t in all_tensors):
            raise ModelLoadError(
                "models that mix BF16 and string tensors are not supported by onnxruntime's "
                "Python API"
            )

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Run the model. BF16 tensors are carried as uint16 bit patterns both ways."""
        try:
            if not self._bf16:
                return list(self._session.run(list(output_names), dict(feeds)))
            return self._run_with_bf16(feeds, output_names)
        except _ORT_INPUT_ERRORS as error:
            # onnxruntime's own input checks caught something our validation did not.
            log.warning("onnxruntime rejected an input: %s", error)
            raise InvalidInputError(f"the model rejected the input: {_first_line(error)}") from None
        except Exception as error:  # onnxruntime's pybind exceptions share no base class
            if fatal.is_fatal_message(str(error)):
                fatal.report(f"onnxruntime: {_first_line(error)}")
                raise FatalRuntimeError(
                    "the server hit a fatal runtime error and is restarting; retry the request"
                ) from None
            log.exception("onnxruntime run failed")
            raise ModelExecutionError(
                f"onnxruntime failed to execute the model: {_first_line(error)}"
            ) from None

    def _run_with_bf16(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        values = {
            name: (
                ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    np.ascontiguousarray(array),
                    16,  # onnx.TensorProto.BFLOAT16
                )
                if name in self._bf16
                else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            )
            for name, array in feeds.items()
        }
        results = self._session.run_with_ort_values(list(output_names), values)
        return [
            _bf16_to_numpy(value) if name in self._bf16 else value.numpy()
            for name, value in zip(output_names, results, strict=True)
        ]


def _bf16_to_numpy(value: Any) -> np.ndarray:
    shape = tuple(value.shape())
    size = int(value.tensor_size_in_bytes())
    data = ctypes.string_at(value.data_ptr(), size) if size else b""
    return np.frombuffer(data, dtype=np.uint16).reshape(shape)
