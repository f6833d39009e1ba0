"""Model configuration: read config.pbtxt, complete it from the ONNX graph, check it.

The result of loading is a completed `ModelConfig` (what the ModelConfig RPC
returns, as Triton does) and a `ModelSignature` (what request validation uses).
Every rejection names the field, the value found and what was expected, since
the reader is an operator looking at a RepositoryIndex reason or a log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from google.protobuf import json_format, text_format

from .datatypes import BY_CONFIG_NAME, BY_ORT_TYPE, DataType, format_shape
from .errors import ModelLoadError
from .protocol import model_config_pb2 as mc

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
ACCEPTED_PLATFORMS = {"", PLATFORM}
ACCEPTED_BACKENDS = {"", BACKEND}


class ModelConfigError(ModelLoadError):
    """config.pbtxt is malformed or disagrees with the model."""


# ---------------------------------------------------------------- the graph ---


@dataclass(frozen=True)
class GraphTensor:
    """An input or output as the ONNX graph declares it. None dims are dynamic."""

    name: str
    ort_type: str
    shape: tuple[int | None, ...]
    # The graph's names for dynamic dims ("batch", "sequence"); equal names must match.
    symbols: tuple[str | None, ...] = ()

    @property
    def datatype(self) -> DataType | None:
        return BY_ORT_TYPE.get(self.ort_type)

    @property
    def first_dim_dynamic(self) -> bool:
        return len(self.shape) >= 1 and self.shape[0] is None


@dataclass(frozen=True)
class GraphSignature:
    """What the ONNX graph needs and produces, read from an onnxruntime session."""

    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]
    # Initializers a caller may override: inputs that can be declared optional.
    overridable: tuple[GraphTensor, ...] = ()

    def input(self, name: str) -> GraphTensor | None:
        for tensor in (*self.inputs, *self.overridable):
            if tensor.name == name:
                return tensor
        return None

    def output(self, name: str) -> GraphTensor | None:
        return next((t for t in self.outputs if t.name == name), None)

    @property
    def batchable(self) -> bool:
        return all(t.first_dim_dynamic for t in (*self.inputs, *self.outputs))


# ----------------------------------------------------------- the signature ---


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as clients see it (dims exclude the batch dimension)."""

    name: str
    datatype: DataType
    dims: tuple[int, ...]
    # The shape the model itself takes (config `reshape`), without batch dim.
    model_dims: tuple[int, ...] | None = None
    optional: bool = False
    # Per dim of `dims`: the graph's symbol for it, when the graph ties dims together.
    symbols: tuple[str | None, ...] = ()

    def client_shape(self, batching: bool) -> list[int]:
        return ([-1] if batching else []) + list(self.dims)


@dataclass(frozen=True)
class ModelSignature:
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Text models: the BYTES input the server tokenizes, and the inputs it fills.
    text_input: str | None = None
    token_inputs: tuple[str, ...] = ()
    max_tokens: int = 0  # longest token sequence accepted, text or token ids
    # Inputs the batcher may pad along their variable dims, and the value to pad with.
    pad_values: dict[str, float] = field(default_factory=dict)

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    @cached_property
    def inputs_by_name(self) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in self.inputs}

    @cached_property
    def outputs_by_name(self) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in self.outputs}

    def input(self, name: str) -> TensorSpec | None:
        return self.inputs_by_name.get(name)

    def output(self, name: str) -> TensorSpec | None:
        return self.outputs_by_name.get(name)


# ---------------------------------------------------------------- reading ---

# Merged into a config before parsing: if it survives, the file did not set the field.
_UNSET_BATCH_SIZE = -(2**31)


@dataclass(frozen=True)
class ConfigFile:
    config: mc.ModelConfig
    # proto3 cannot tell `max_batch_size: 0` from absent; auto-complete must.
    max_batch_size_given: bool


def read_config(path: Path) -> ConfigFile:
    """Parse config.pbtxt; fields from newer Triton releases are skipped with a warning."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelConfigError(f"cannot read {path.name}: {error}") from None
    return parse_config_text(text, source=path.name)


def parse_config_json(text: str) -> ConfigFile:
    """A configuration given as JSON (RepositoryModelLoad's `config` parameter, as Triton)."""
    config = mc.ModelConfig(max_batch_size=_UNSET_BATCH_SIZE)
    try:
        json_format.Parse(text, config, ignore_unknown_fields=False)
    except json_format.ParseError as error:
        raise ModelConfigError(f"not a valid model configuration in JSON: {error}") from None
    given = config.max_batch_size != _UNSET_BATCH_SIZE
    if not given:
        config.max_batch_size = 0
    return ConfigFile(config, max_batch_size_given=given)


def _parse(text: str, allow_unknown: bool) -> mc.ModelConfig:
    config = mc.ModelConfig(max_batch_size=_UNSET_BATCH_SIZE)
    text_format.Merge(text, config, allow_unknown_field=allow_unknown)
    return config


def parse_config_text(text: str, source: str = "config.pbtxt") -> ConfigFile:
    try:
        config = _parse(text, allow_unknown=False)
    except text_format.ParseError as strict_error:
        if "no field named" not in str(strict_error) and "no value named" not in str(strict_error):
            raise ModelConfigError(f"{source}: {strict_error}") from None
        try:
            config = _parse(text, allow_unknown=True)
        except text_format.ParseError as error:
            raise ModelConfigError(f"{source}: {error}") from None
        log.warning("%s: ignoring fields this server does not know: %s", source, strict_error)
    given = config.max_batch_size != _UNSET_BATCH_SIZE
    if not given:
        config.max_batch_size = 0
    return ConfigFile(config, given)


# ------------------------------------------------------------- completion ---


def _config_dims(shape: tuple[int | None, ...]) -> list[int]:
    return [-1 if d is None else d for d in shape]


def normalize_config(file: ConfigFile, model_name: str, gpu_available: bool) -> mc.ModelConfig:
    """Defaults that need no graph, applied with or without auto-complete (as Triton does)."""
    config = mc.ModelConfig()
    config.CopyFrom(file.config)
    if not config.name:
        config.name = model_name
    if not config.platform and not config.backend:
        config.platform = PLATFORM
        config.backend = BACKEND
    if not config.instance_group:
        config.instance_group.add()
    for index, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{index}"
        if group.count == 0:
            group.count = 1
        if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
            group.kind = (
                mc.ModelInstanceGroup.KIND_GPU if gpu_available else mc.ModelInstanceGroup.KIND_CPU
            )
    return config


def complete_config(
    file: ConfigFile,
    graph: GraphSignature,
    model_name: str,
    default_max_batch_size: int,
    gpu_available: bool = False,
) -> mc.ModelConfig:
    """Fill what config.pbtxt leaves out from the graph, the way Triton's auto-complete does.

    Differences from Triton, all deliberate: an explicit `max_batch_size: 0`
    is respected (Triton overrides it); `dynamic_batching {}` is added only
    when auto-complete chose max_batch_size, so a config that sets
    max_batch_size without dynamic_batching runs requests one by one as
    written; and a partially described tensor (name only) gets its type and
    dims filled rather than rejected. Like
    Triton, a tensor with no dims left (a [batch] vector, a scalar) becomes
    dims [1] with reshape [], so clients send [batch, 1].
    """
    config = normalize_config(file, model_name, gpu_available)
    if not file.max_batch_size_given:
        config.max_batch_size = default_max_batch_size if _batching_possible(config, graph) else 0
    skip = 1 if config.max_batch_size > 0 else 0
    _complete_tensors(config.input, graph.inputs, skip)
    _complete_tensors(config.output, graph.outputs, skip)
    chosen_here = not file.max_batch_size_given
    if chosen_here and config.max_batch_size > 1 and config.WhichOneof("scheduling_choice") is None:
        config.dynamic_batching.SetInParent()
    return config


def _batching_possible(config: mc.ModelConfig, graph: GraphSignature) -> bool:
    if not graph.batchable:
        return False
    # If the config already gives dims, they must describe the non-batch part.
    for listed, tensors in ((config.input, graph.inputs), (config.output, graph.outputs)):
        for entry in listed:
            tensor = next((t for t in tensors if t.name == entry.name), None)
            if tensor is None or not entry.dims or entry.HasField("reshape"):
                continue
            if len(entry.dims) != len(tensor.shape) - 1:
                return False
    return True


def _complete_tensors(listed, tensors: tuple[GraphTensor, ...], skip: int) -> None:  # type: ignore[no-untyped-def]
    by_name = {entry.name: entry for entry in listed}
    for tensor in tensors:
        entry = by_name.get(tensor.name)
        if entry is None:
            entry = listed.add()
            entry.name = tensor.name
        if entry.data_type == mc.TYPE_INVALID and tensor.datatype is not None:
            entry.data_type = mc.DataType.Value(tensor.datatype.config_name)
        if not entry.dims and not entry.HasField("reshape"):
            dims = _config_dims(tensor.shape[skip:])
            if dims:
                entry.dims.extend(dims)
            else:
                entry.dims.append(1)
                entry.reshape.SetInParent()


# ------------------------------------------------------------- validation ---


def validate_config(
    config: mc.ModelConfig, graph: GraphSignature, model_name: str
) -> ModelSignature:
    """Check the completed config against the graph and derive the request signature."""
    if config.name != model_name:
        raise ModelConfigError(
            f"config name '{config.name}' does not match the model folder '{model_name}'"
        )
    if config.platform not in ACCEPTED_PLATFORMS or config.backend not in ACCEPTED_BACKENDS:
        raise ModelConfigError(
            f"platform '{config.platform}' / backend '{config.backend}' is not supported: "
            f"this server runs ONNX models (platform '{PLATFORM}' or backend '{BACKEND}')"
        )
    if config.max_batch_size < 0:
        raise ModelConfigError(f"max_batch_size is {config.max_batch_size}; expected ≥ 0")
    scheduling = config.WhichOneof("scheduling_choice")
    if scheduling in ("sequence_batching", "ensemble_scheduling"):
        raise ModelConfigError(f"{scheduling} is not supported by this server")
    if scheduling == "dynamic_batching" and config.max_batch_size == 0:
        raise ModelConfigError(
            "dynamic_batching needs max_batch_size > 0; "
            "set max_batch_size or remove dynamic_batching"
        )
    if config.batch_input or config.batch_output:
        raise ModelConfigError("batch_input/batch_output (ragged batching) are not supported")
    for group in config.instance_group:
        if group.count < 1:
            raise ModelConfigError(
                f"instance_group '{group.name}' count is {group.count}; expected ≥ 1"
            )
        if group.kind == mc.ModelInstanceGroup.KIND_MODEL:
            raise ModelConfigError(
                "instance_group kind KIND_MODEL is not supported; use KIND_CPU or KIND_GPU"
            )
    if config.version_policy.WhichOneof("policy_choice") == "specific" and not (
        config.version_policy.specific.versions
    ):
        raise ModelConfigError("version_policy specific lists no versions")

    batching = config.max_batch_size > 0
    inputs = tuple(
        _check_tensor(entry, graph.input(entry.name), "input", batching) for entry in config.input
    )
    outputs = tuple(
        _check_tensor(entry, graph.output(entry.name), "output", batching)
        for entry in config.output
    )
    _check_unique(inputs, "input")
    _check_unique(outputs, "output")
    if not outputs:
        raise ModelConfigError("the model declares no outputs")

    listed = {spec.name for spec in inputs}
    for tensor in graph.inputs:
        if tensor.name not in listed:
            raise ModelConfigError(
                f"model input '{tensor.name}' is missing from config.pbtxt "
                "(list it, or turn auto-complete on)"
            )
    pad_values = parse_padding(config, inputs)
    overridable = {t.name for t in graph.overridable}
    for entry in config.input:
        if entry.optional and entry.name not in overridable:
            raise ModelConfigError(
                f"input '{entry.name}' is marked optional but the model requires it"
            )
    signature = ModelSignature(config.max_batch_size, inputs, outputs, pad_values=pad_values)
    check_padding_can_be_undone(signature)
    return signature


def parse_padding(config: mc.ModelConfig, inputs: tuple[TensorSpec, ...]) -> dict[str, float]:
    """`parameters { key: "padding" value: { string_value: "input_ids:0, attention_mask:0" } }`.

    Declares that requests whose listed inputs differ in their variable (-1)
    dims may still be batched, padded to the longest with the given value, and
    that the model ignores the padding (an attention mask, say). Outputs are
    cut back to each request's own sizes.
    """
    if "padding" not in config.parameters:
        return {}
    if config.max_batch_size < 1:
        raise ModelConfigError("parameter 'padding' needs a batching model (max_batch_size > 0)")
    values: dict[str, float] = {}
    for item in config.parameters["padding"].string_value.split(","):
        if not item.strip():
            continue
        name, separator, text = item.partition(":")
        name = name.strip()
        spec = next((s for s in inputs if s.name == name), None)
        if not separator or spec is None:
            raise ModelConfigError(
                f"parameter 'padding' entry '{item.strip()}': expected <input>:<value> naming "
                f"one of the inputs ({', '.join(s.name for s in inputs)})"
            )
        if spec.datatype.is_bytes or spec.model_dims is not None or -1 not in spec.dims:
            raise ModelConfigError(
                f"parameter 'padding': input '{name}' cannot be padded (it needs a numeric type, "
                "a variable (-1) dimension and no reshape)"
            )
        try:
            values[name] = float(text)
        except ValueError:
            raise ModelConfigError(
                f"parameter 'padding': value '{text.strip()}' for input '{name}' is not a number"
            ) from None
    return values


def check_padding_can_be_undone(signature: ModelSignature) -> None:
    """With padding on, every variable output dim must follow a padded input dim.

    Outputs are cut back per request along the dims the graph names like a
    padded input's variable dim ('sequence'). A variable output dim with
    another name, or behind a reshape, could not be cut, and shorter requests
    would receive results computed on padding: refuse such a configuration.
    """
    if not signature.pad_values:
        return
    padded = {
        spec.symbols[axis]
        for spec in signature.inputs
        if spec.name in signature.pad_values
        for axis, dim in enumerate(spec.dims)
        if dim == -1 and axis < len(spec.symbols) and spec.symbols[axis] is not None
    }
    for spec in signature.outputs:
        for axis, dim in enumerate(spec.dims):
            symbol = spec.symbols[axis] if axis < len(spec.symbols) else None
            if dim == -1 and (spec.model_dims is not None or symbol not in padded):
                names = ", ".join(sorted(str(p) for p in padded)) or "none"
                raise ModelConfigError(
                    f"output '{spec.name}' has a variable dimension {axis + 1} that the graph "
                    f"does not tie to a padded input's dimension ({names}), so padded batches "
                    "could not be cut back per request; remove 'padding' or give the output "
                    "fixed dims"
                )


def _check_unique(specs: tuple[TensorSpec, ...], kind: str) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ModelConfigError(f"{kind} '{spec.name}' is listed twice in config.pbtxt")
        seen.add(spec.name)


def _check_dims(dims: list[int], where: str) -> None:
    for dim in dims:
        if dim == 0 or dim < -1:
            raise ModelConfigError(f"{where} has dimension {dim}; expected a size ≥ 1 or -1 (any)")


def _check_tensor(entry, tensor: GraphTensor | None, kind: str, batching: bool) -> TensorSpec:  # type: ignore[no-untyped-def]
    where = f"{kind} '{entry.name}'"
    if not entry.name:
        raise ModelConfigError(f"an {kind} in config.pbtxt has no name")
    if tensor is None:
        raise ModelConfigError(f"{where} in config.pbtxt is not an {kind} of the ONNX model")
    graph_type = tensor.datatype
    if graph_type is None:
        raise ModelConfigError(f"{where} has ONNX type {tensor.ort_type}, which is not supported")
    config_type = BY_CONFIG_NAME.get(mc.DataType.Name(entry.data_type))
    if config_type is None:
        raise ModelConfigError(f"{where} has no data_type")
    if config_type is not graph_type:
        raise ModelConfigError(
            f"{where} has data_type {config_type.config_name} but the model's is "
            f"{graph_type.config_name}"
        )
    if entry.is_shape_tensor:
        raise ModelConfigError(f"{where}: shape tensors are not supported")
    if getattr(entry, "allow_ragged_batch", False):
        raise ModelConfigError(f"{where}: allow_ragged_batch is not supported")
    dims = list(entry.dims)
    if not dims and not entry.HasField("reshape"):
        raise ModelConfigError(f"{where} has no dims")
    _check_dims(dims, where)
    model_dims: list[int] | None = None
    if entry.HasField("reshape"):
        model_dims = list(entry.reshape.shape)
        _check_dims(model_dims, f"{where} reshape")
        if -1 not in dims and -1 not in model_dims and _product(dims) != _product(model_dims):
            raise ModelConfigError(
                f"{where}: dims {format_shape(dims)} and reshape {format_shape(model_dims)} "
                "hold different numbers of elements"
            )
        # Inputs are reshaped into `reshape`, outputs back into `dims`: numpy can
        # infer one unknown size per reshape, not more.
        target = model_dims if kind == "input" else dims
        if target.count(-1) > 1:
            raise ModelConfigError(
                f"{where}: with reshape, {'reshape' if kind == 'input' else 'dims'} may "
                "contain at most one -1"
            )
    seen_by_model = ([-1] if batching else []) + (model_dims if model_dims is not None else dims)
    if len(seen_by_model) != len(tensor.shape):
        raise ModelConfigError(
            f"{where} has {len(seen_by_model)} dimensions in config.pbtxt "
            f"({_describe(batching)}) but {len(tensor.shape)} in the model "
            f"{format_shape(_config_dims(tensor.shape))}"
        )
    for axis, (ours, theirs) in enumerate(zip(seen_by_model, tensor.shape, strict=True)):
        if theirs is None:
            continue
        if batching and axis == 0:
            raise ModelConfigError(
                f"{where}: max_batch_size > 0 needs a dynamic first dimension, but the model "
                f"fixes it at {theirs}; set max_batch_size: 0"
            )
        if ours != theirs:
            raise ModelConfigError(
                f"{where}: dimension {axis} is {ours} in config.pbtxt but the model requires "
                f"{theirs}"
            )
    symbols: tuple[str | None, ...] = ()
    if model_dims is None and len(tensor.symbols) == len(tensor.shape):
        symbols = tensor.symbols[1:] if batching else tensor.symbols
    return TensorSpec(
        name=entry.name,
        datatype=config_type,
        dims=tuple(dims),
        model_dims=tuple(model_dims) if model_dims is not None else None,
        optional=bool(getattr(entry, "optional", False)),
        symbols=symbols,
    )


def _describe(batching: bool) -> str:
    return "counting the batch dimension" if batching else "no batch dimension"


def _product(values: list[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result
