"""onnxruntime sessions: placement, session options from config, and execution.

This is the only module that imports onnxruntime. Sessions are created once
per model version and device and run from worker threads: onnxruntime releases
the GIL inside `run()` and allows concurrent runs on one session, so one
session serves every instance of a model version on its device. GPU sessions
run through IOBinding.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import fatal
from .errors import FatalRuntimeError, InvalidInputError, ModelExecutionError, ModelLoadError
from .model_config import GraphSignature, GraphTensor, ModelConfigError
from .placement import CPU, CUDA, TENSORRT, Device
from .protocol import model_config_pb2 as mc
from .threads import Threads

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


# Triton's onnxruntime backend numbers graph optimization levels this way.
_GRAPH_LEVELS = {
    0: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_INT_PARAMETERS = ("intra_op_thread_count", "inter_op_thread_count", "execution_mode")
_BOOL_PARAMETERS = ("enable_mem_arena", "enable_mem_pattern", "allow_spinning")
# Read by thread_parameters and decided by service.threads; the rest apply as given.
_THREAD_PARAMETERS = ("intra_op_thread_count", "allow_spinning")


_cuda_libraries = threading.Lock()
_cuda_libraries_loaded = False


def load_cuda_libraries() -> None:
    """Load CUDA and cuDNN from pip's nvidia-* packages before the first CUDA session.

    onnxruntime-gpu installed with its `cuda`/`cudnn` extras finds those libraries only
    when they are loaded first (`preload_dlls`); in a CUDA base image they are on the
    default path and this changes nothing. Failure is left to session creation, which
    then reports that CUDA did not start.
    """
    global _cuda_libraries_loaded
    with _cuda_libraries:
        if _cuda_libraries_loaded:
            return
        _cuda_libraries_loaded = True
        preload = getattr(ort, "preload_dlls", None)
        if preload is None:
            return
        try:
            preload(directory="")
        except Exception as error:  # missing packages are not an error by themselves
            log.debug("onnxruntime.preload_dlls: %s", error)


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def runtime_version() -> str:
    return str(ort.__version__)


def _parameter(config: mc.ModelConfig, key: str) -> str | None:
    if key in config.parameters:
        return config.parameters[key].string_value.strip()
    return None


def _integer_parameters(config: mc.ModelConfig) -> dict[str, int]:
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
    return values


def thread_parameters(config: mc.ModelConfig) -> tuple[int | None, bool | None]:
    """The model's own `intra_op_thread_count` and `allow_spinning`, where it sets them."""
    values = _integer_parameters(config)
    intra = values.get("intra_op_thread_count")
    spinning = values.get("allow_spinning")
    return intra, None if spinning is None else bool(spinning)


def session_options(
    config: mc.ModelConfig, model_dir: Path, threads: Threads
) -> ort.SessionOptions:
    """SessionOptions from Triton's onnxruntime parameters and optimization settings.

    Threads and spinning come from `threads` (service.threads decides them,
    honouring the model's parameters); every other parameter applies as given.
    """
    options = ort.SessionOptions()
    # Fatal only: errors reach us as exceptions and are logged with the request's id.
    options.log_severity_level = 4
    values = _integer_parameters(config)
    if threads.intra_op:
        options.intra_op_num_threads = threads.intra_op
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
    spin = "1" if threads.spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if threads.spinning and threads.spin_during_runs_only:
        options.add_session_config_entry("session.force_spinning_stop", "1")
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

    def __init__(
        self,
        model_path: Path,
        options: ort.SessionOptions,
        device: Device,
        io_binding: bool = True,
        fallback_to_cpu: bool = False,
    ) -> None:
        self.notes: list[str] = []
        if device.gpu is not None:
            load_cuda_libraries()
        self._session = self._create(model_path, options, device.providers)
        in_use = self._session.get_providers()
        if device.gpu is not None and not {CUDA, TENSORRT} & set(in_use):
            # onnxruntime drops a provider it cannot start (no driver, missing CUDA or
            # cuDNN libraries) and carries on with the CPU: say so instead.
            problem = (
                f"onnxruntime could not start CUDA on {device.label} (providers in use: "
                f"[{', '.join(in_use)}]); check the NVIDIA driver and the CUDA/cuDNN libraries"
            )
            if not fallback_to_cpu:
                raise ModelLoadError(problem + ", or allow --gpu-fallback-to-cpu")
            self.notes.append(problem + ": running on CPU")
            device = Device("CPU", None, ((CPU, {}),))
            self._session = self._create(model_path, options, device.providers)
        elif device.wanted == TENSORRT and TENSORRT not in in_use:
            self.notes.append(f"TensorRT did not start on {device.label}: running on CUDA")
        self.graph = GraphSignature(
            inputs=tuple(_graph_tensor(arg) for arg in self._session.get_inputs()),
            outputs=tuple(_graph_tensor(arg) for arg in self._session.get_outputs()),
            overridable=tuple(
                _graph_tensor(arg) for arg in self._session.get_overridable_initializers()
            ),
        )
        self.provider = self._session.get_providers()[0]
        self.device = device.label
        self.on_gpu = self.provider in (CUDA, TENSORRT)
        self.gpu = device.gpu if self.on_gpu else None
        all_tensors = (*self.graph.inputs, *self.graph.outputs, *self.graph.overridable)
        self._bf16 = {t.name for t in all_tensors if t.ort_type == "tensor(bfloat16)"}
        if self._bf16 and any(t.ort_type == "tensor(string)" for t in all_tensors):
            raise ModelLoadError(
                "models that mix BF16 and string tensors are not supported by onnxruntime's "
                "Python API"
            )
        # IOBinding: each input is copied to the device once and each output back once,
        # into memory onnxruntime allocates; strings never leave the CPU.
        self._bind = (
            io_binding
            and self.on_gpu
            and not self._bf16
            and not any(t.ort_type == "tensor(string)" for t in all_tensors)
        )

    @staticmethod
    def _create(
        model_path: Path, options: ort.SessionOptions, providers: tuple[Any, ...]
    ) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                str(model_path), sess_options=options, providers=list(providers)
            )
        except Exception as error:  # onnxruntime raises several unrelated types here
            raise ModelLoadError(
                f"onnxruntime could not load {model_path.name}: {_first_line(error)}"
            ) from None

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Run the model. BF16 tensors are carried as uint16 bit patterns both ways."""
        try:
            if self._bind:
                return self._run_bound(feeds, output_names)
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

    def _run_bound(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        binding = self._session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in output_names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

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
