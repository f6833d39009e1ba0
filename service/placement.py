"""Where a model version runs: instance groups and accelerators turned into providers.

Triton users describe placement in `config.pbtxt`: `instance_group { kind, gpus,
count }` and, for TensorRT, `optimization { execution_accelerators {
gpu_execution_accelerator { name: "tensorrt" parameters {...} } } }`. This
module turns that into onnxruntime provider chains, one per device, without
importing onnxruntime, so every rule is testable on a machine without a GPU.

Decisions a user would otherwise discover in production are made here and
said out loud: a GPU request on a machine without CUDA fails the load with the
provider list (or, with --gpu-fallback-to-cpu, loads on CPU with a warning);
TensorRT falls back to CUDA when its libraries are absent; cuDNN's algorithm
search defaults to HEURISTIC, because EXHAUSTIVE re-benchmarks every new input
shape and a dynamic batcher makes new shapes all the time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError
from .model_config import ModelConfigError
from .protocol import model_config_pb2 as mc
from .settings import ARENA_STRATEGIES, CONV_ALGO_SEARCHES, Settings

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

ProviderSpec = tuple[str, dict[str, str]]


@dataclass(frozen=True)
class GpuDefaults:
    """Server-wide CUDA settings; a model's `cuda` accelerator parameters override them."""

    conv_algo_search: str = "HEURISTIC"
    memory_limit_bytes: int = 0  # 0: no limit
    arena_extend_strategy: str = "kSameAsRequested"
    fallback_to_cpu: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> GpuDefaults:
        return cls(
            settings.cuda_conv_algo_search,
            settings.cuda_memory_limit_bytes,
            settings.cuda_arena_extend_strategy,
            settings.gpu_fallback_to_cpu,
        )


@dataclass(frozen=True)
class Device:
    """One device a model version runs on and the providers onnxruntime tries, in order."""

    label: str  # "CPU", "GPU 0"
    gpu: int | None
    providers: tuple[ProviderSpec, ...]

    @property
    def wanted(self) -> str:
        """The provider this device is meant to run on (the first of the chain)."""
        return self.providers[0][0]


@dataclass(frozen=True)
class Placement:
    """Where a model version's sessions live and how many batches run at once on each."""

    devices: tuple[Device, ...]
    instances_per_device: int
    # Why a GPU request runs on CPU or TensorRT runs as CUDA; empty when all went as asked.
    notes: tuple[str, ...] = field(default=())
    # Whether a GPU session that cannot start may run on the CPU instead: KIND_AUTO
    # always (CUDA installed but unusable is still "no GPU"), KIND_GPU only with
    # --gpu-fallback-to-cpu.
    cpu_fallback: bool = False

    @property
    def instance_count(self) -> int:
        return self.instances_per_device * len(self.devices)

    @property
    def on_gpu(self) -> bool:
        return self.devices[0].gpu is not None


def plan_placement(
    config: mc.ModelConfig,
    available: Sequence[str],
    gpu_count: int | None,
    defaults: GpuDefaults,
    tensorrt_libraries: bool,
    model_dir: Path,
    kind_auto: bool = False,
) -> Placement:
    """Providers per device from `instance_group` and the GPU accelerators.

    `gpu_count` is what NVML (or CUDA_VISIBLE_DEVICES) says, None when unknown;
    `tensorrt_libraries` whether TensorRT's own libraries can be loaded, which
    onnxruntime's provider list does not tell; `kind_auto` whether the model's
    own config left the kind to the server (see `leaves_kind_to_server`), which a
    config normalised to KIND_GPU no longer shows.
    """
    groups = list(config.instance_group)
    kinds = {group.kind for group in groups}
    if len(kinds) > 1:
        raise ModelConfigError("instance groups of different kinds in one model are not supported")
    kind = kinds.pop() if kinds else mc.ModelInstanceGroup.KIND_AUTO
    count = max(1, sum(group.count for group in groups))
    # Malformed accelerator parameters fail the load on every machine, GPU or not.
    accelerators = _gpu_accelerators(config)
    cuda_parameters = accelerators.get("cuda", {})
    tensorrt_parameters = accelerators.get("tensorrt")
    cuda_options(0, cuda_parameters, defaults)
    if tensorrt_parameters is not None:
        tensorrt_options(0, tensorrt_parameters, config, model_dir)
    cuda_ready = CUDA in available and gpu_count != 0
    if kind == mc.ModelInstanceGroup.KIND_CPU or (
        kind == mc.ModelInstanceGroup.KIND_AUTO and not cuda_ready
    ):
        return Placement((Device("CPU", None, ((CPU, {}),)),), count)
    if not cuda_ready:
        why = (
            f"onnxruntime offers only [{', '.join(available)}]"
            if CUDA not in available
            else "CUDA's provider is installed but no GPU is visible"
        )
        message = (
            f"instance_group asks for KIND_GPU but {why}; install the 'gpu' extra "
            "(onnxruntime-gpu) on a machine with an NVIDIA GPU and driver, set kind: KIND_CPU, "
            "or start the server with --gpu-fallback-to-cpu"
        )
        if not defaults.fallback_to_cpu:
            raise ModelLoadError(message)
        note = f"{message.split(';')[0]}: running on CPU (--gpu-fallback-to-cpu)"
        return Placement((Device("CPU", None, ((CPU, {}),)),), count, (note,))
    gpus = sorted({gpu for group in groups for gpu in group.gpus})
    if gpus and gpu_count is not None:
        missing = [gpu for gpu in gpus if gpu >= gpu_count or gpu < 0]
        if missing:
            raise ModelLoadError(
                f"instance_group asks for GPU {', '.join(map(str, missing))} but "
                f"{gpu_count} GPU(s) are visible (0..{gpu_count - 1})"
            )
    if not gpus:
        # Triton places `count` instances on every visible GPU when `gpus` is not given.
        gpus = list(range(gpu_count)) if gpu_count else [0]
    notes: list[str] = []
    use_tensorrt = tensorrt_parameters is not None
    if use_tensorrt and (TENSORRT not in available or not tensorrt_libraries):
        notes.append(
            "TensorRT was asked for but "
            + (
                "this onnxruntime has no TensorRT provider"
                if TENSORRT not in available
                else "TensorRT's libraries (libnvinfer) are not installed"
            )
            + ": running on CUDA"
        )
        use_tensorrt = False
    devices = []
    for gpu in gpus:
        chain: list[ProviderSpec] = []
        if use_tensorrt:
            assert tensorrt_parameters is not None
            chain.append((TENSORRT, tensorrt_options(gpu, tensorrt_parameters, config, model_dir)))
        chain.append((CUDA, cuda_options(gpu, cuda_parameters, defaults)))
        chain.append((CPU, {}))
        devices.append(Device(f"GPU {gpu}", gpu, tuple(chain)))
    cpu_fallback = defaults.fallback_to_cpu or kind_auto or kind == mc.ModelInstanceGroup.KIND_AUTO
    return Placement(tuple(devices), count, tuple(notes), cpu_fallback)


def leaves_kind_to_server(config: mc.ModelConfig) -> bool:
    """KIND_AUTO, or no instance_group at all: the GPU if it works, else the CPU.

    Judged on the config as written: normalisation turns KIND_AUTO into KIND_GPU
    wherever onnxruntime lists CUDA, including a GPU image on a machine without a
    GPU or driver, where CUDA then fails to start and the model must still load.
    """
    groups = config.instance_group
    return not groups or any(g.kind == mc.ModelInstanceGroup.KIND_AUTO for g in groups)


def _gpu_accelerators(config: mc.ModelConfig) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        name = accelerator.name.strip().lower()
        if name not in ("tensorrt", "cuda"):
            raise ModelConfigError(
                f"gpu_execution_accelerator '{accelerator.name}' is not supported; "
                "expected 'tensorrt' or 'cuda'"
            )
        if name in found:
            raise ModelConfigError(f"gpu_execution_accelerator '{name}' is listed twice")
        found[name] = dict(accelerator.parameters)
    if config.optimization.execution_accelerators.cpu_execution_accelerator:
        cpu_accelerators = config.optimization.execution_accelerators.cpu_execution_accelerator
        names = [accelerator.name for accelerator in cpu_accelerators]
        raise ModelConfigError(
            f"cpu_execution_accelerator {names} is not supported (OpenVINO is not bundled)"
        )
    return found


# --------------------------------------------------------------- CUDA ---

_CUDA_FLAGS = (
    "cudnn_conv_use_max_workspace",
    "do_copy_in_default_stream",
    "use_tf32",
    "prefer_nhwc",
)


def cuda_options(gpu: int, parameters: Mapping[str, str], defaults: GpuDefaults) -> dict[str, str]:
    """CUDA provider options: the server's defaults, then the model's `cuda` parameters."""
    options = {
        "device_id": str(gpu),
        "cudnn_conv_algo_search": defaults.conv_algo_search,
        "arena_extend_strategy": defaults.arena_extend_strategy,
        "do_copy_in_default_stream": "1",
        "cudnn_conv_use_max_workspace": "1",
        # onnxruntime's default is TF32 matrix units on Ampere and newer: ~1e-3 relative
        # error on FP32 models. Served results should match the CPU; a model opts in.
        "use_tf32": "0",
    }
    if defaults.memory_limit_bytes:
        options["gpu_mem_limit"] = str(defaults.memory_limit_bytes)
    for key, raw in parameters.items():
        value = raw.strip()
        where = f"cuda accelerator parameter '{key}'"
        if key == "cudnn_conv_algo_search":
            value = value.upper()
            if value not in CONV_ALGO_SEARCHES:
                raise ModelConfigError(
                    f"{where} is '{raw}'; expected one of {', '.join(CONV_ALGO_SEARCHES)}"
                )
        elif key == "gpu_mem_limit":
            if _integer(value, where) < 1:
                raise ModelConfigError(f"{where} is '{raw}'; expected a number of bytes ≥ 1")
        elif key == "arena_extend_strategy":
            if value not in ARENA_STRATEGIES:
                raise ModelConfigError(
                    f"{where} is '{raw}'; expected one of {', '.join(ARENA_STRATEGIES)}"
                )
        elif key in _CUDA_FLAGS:
            value = _flag(value, where)
        elif key == "enable_cuda_graph":
            raise ModelConfigError(
                f"{where} is not supported: CUDA graphs need fixed input addresses and shapes, "
                "and the dynamic batcher forms new shapes"
            )
        else:
            allowed = ["cudnn_conv_algo_search", "gpu_mem_limit", "arena_extend_strategy"]
            raise ModelConfigError(
                f"{where} is not known; expected one of {', '.join(allowed + list(_CUDA_FLAGS))}"
            )
        options[key] = value
    return options


# ----------------------------------------------------------- TensorRT ---

# Triton's onnxruntime backend names on the left, onnxruntime's on the right.
_TENSORRT_RENAMES = {"max_workspace_size_bytes": "trt_max_workspace_size"}
_TENSORRT_INTEGERS = (
    "trt_max_workspace_size",
    "trt_max_partition_iterations",
    "trt_min_subgraph_size",
    "trt_builder_optimization_level",
)
_TENSORRT_FLAGS = (
    "trt_engine_cache_enable",
    "trt_timing_cache_enable",
    "trt_force_sequential_engine_build",
    "trt_layer_norm_fp32_fallback",
    "trt_build_heuristics_enable",
    "trt_sparsity_enable",
    "trt_dump_subgraphs",
)
_TENSORRT_PATHS = ("trt_engine_cache_path", "trt_timing_cache_path")
_PROFILE_KEYS = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
_PRECISIONS = ("FP32", "FP16", "INT8")
_PROFILE = re.compile(r"^[^:,\s]+:\d+(x\d+)*$")


def tensorrt_options(
    gpu: int, parameters: Mapping[str, str], config: mc.ModelConfig, model_dir: Path
) -> dict[str, str]:
    """TensorRT provider options from Triton's accelerator parameters.

    Without explicit profiles, a batching model whose inputs are all described
    in the config gets min/opt/max profiles spanning batch 1..max_batch_size
    (and 1..max_sequence_length for dynamic dims): without them TensorRT builds
    a new engine for every new shape the batcher forms.
    """
    options = {"device_id": str(gpu)}
    for key, raw in parameters.items():
        name = _TENSORRT_RENAMES.get(key, key)
        value = raw.strip()
        where = f"tensorrt accelerator parameter '{key}'"
        if key == "precision_mode":
            precision = value.upper()
            if precision not in _PRECISIONS:
                raise ModelConfigError(
                    f"{where} is '{raw}'; expected one of {', '.join(_PRECISIONS)}"
                )
            options["trt_fp16_enable"] = "1" if precision in ("FP16", "INT8") else "0"
            options["trt_int8_enable"] = "1" if precision == "INT8" else "0"
            continue
        if name in _TENSORRT_INTEGERS:
            if _integer(value, where) < 0:
                raise ModelConfigError(f"{where} is '{raw}'; expected an integer ≥ 0")
        elif name in _TENSORRT_FLAGS:
            value = _flag(value, where)
        elif name in _TENSORRT_PATHS:
            path = Path(value)
            value = str(path if path.is_absolute() else (model_dir / path))
        elif name in _PROFILE_KEYS:
            for part in value.split(","):
                if not _PROFILE.match(part.strip()):
                    raise ModelConfigError(
                        f"{where}: '{part}' is not '<input>:<dim>x<dim>...' "
                        "(for example input_ids:1x16,attention_mask:1x16)"
                    )
        else:
            known = ["precision_mode", "max_workspace_size_bytes", *_TENSORRT_FLAGS]
            known += [*_TENSORRT_PATHS, *_PROFILE_KEYS, *_TENSORRT_INTEGERS[1:]]
            raise ModelConfigError(f"{where} is not known; expected one of {', '.join(known)}")
        options[name] = value
    for flag, folder_key in (
        ("trt_engine_cache_enable", "trt_engine_cache_path"),
        ("trt_timing_cache_enable", "trt_timing_cache_path"),
    ):
        if options.get(flag) == "1" and folder_key not in options:
            raise ModelConfigError(
                f"tensorrt accelerator parameter '{flag}' needs '{folder_key}' (a writable folder; "
                "the model repository may be mounted read-only)"
            )
    given = [key for key in _PROFILE_KEYS if key in options]
    if given and len(given) != len(_PROFILE_KEYS):
        raise ModelConfigError(
            "tensorrt accelerator parameters need all of trt_profile_min_shapes, "
            "trt_profile_opt_shapes and trt_profile_max_shapes, or none"
        )
    if not given:
        options.update(automatic_profiles(config))
    return options


def automatic_profiles(config: mc.ModelConfig) -> dict[str, str]:
    """min/opt/max shape profiles covering what the batcher can form; {} when unknown."""
    if not config.input:
        return {}
    batching = config.max_batch_size > 0
    longest = _max_sequence_length(config)
    preferred = list(config.dynamic_batching.preferred_batch_size)
    optimum_rows = max(preferred) if preferred else config.max_batch_size
    profiles: dict[str, list[str]] = {key: [] for key in _PROFILE_KEYS}
    dynamic = False
    for tensor in config.input:
        dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
        if any(d == -1 for d in dims):
            if longest is None:
                return {}
            dynamic = True
        low = [1 if d == -1 else d for d in dims]
        high = [(longest or 1) if d == -1 else d for d in dims]
        if batching:
            low, high = [1, *low], [config.max_batch_size, *high]
            middle = [optimum_rows, *high[1:]]
        else:
            middle = high
        for key, shape in zip(_PROFILE_KEYS, (low, middle, high), strict=True):
            profiles[key].append(f"{tensor.name}:{'x'.join(str(d) for d in shape)}")
    if not batching and not dynamic:
        return {}  # fixed shapes: TensorRT needs no profile
    return {key: ",".join(parts) for key, parts in profiles.items()}


def _max_sequence_length(config: mc.ModelConfig) -> int | None:
    if "max_sequence_length" in config.parameters:
        text = config.parameters["max_sequence_length"].string_value.strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
    return None


def _integer(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ModelConfigError(f"{where} is '{text}'; expected an integer") from None


def _flag(text: str, where: str) -> str:
    lowered = text.lower()
    if lowered in ("1", "true"):
        return "1"
    if lowered in ("0", "false"):
        return "0"
    raise ModelConfigError(f"{where} is '{text}'; expected 0/1 or true/false")
