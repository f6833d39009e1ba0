"""Conversion between inference protocol messages and the core's request/result types."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..datatypes import DataType, decode_raw, element_count, format_shape
from ..errors import InvalidInputError, RequestTooLargeError, UnsupportedError
from ..inference import InferenceRequest, InferenceResult, RequestBuilder
from ..model_config import TensorSpec
from ..protocol import grpc_service_pb2 as pb
from ..shared_memory import (
    OFFSET_PARAMETER,
    REGION_PARAMETER,
    SIZE_PARAMETER,
    Placement,
    SharedMemoryRegions,
)
from .wire import ReceivedInferRequest

# Typed contents fields are wider than some element types; values are range-checked.
_CONTENTS_DTYPES = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}
_SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def decode_parameter(name: str, parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    if choice is None:
        raise InvalidInputError(f"parameter '{name}' has no value")
    return getattr(parameter, choice)


def decode_request_parameters(request: pb.ModelInferRequest) -> dict[str, Any]:
    parameters = {key: decode_parameter(key, value) for key, value in request.parameters.items()}
    for key in _SEQUENCE_PARAMETERS:
        if key in parameters:
            raise UnsupportedError(
                f"parameter '{key}' needs sequence batching, which this server does not support"
            )
    for key in ("priority", "timeout"):
        value = parameters.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(
                f"parameter '{key}' is {value!r}; expected a non-negative integer "
                "(int64_param or uint64_param)"
            )
    return parameters


# Above this much element-by-element work (typed values, BYTES payload bytes),
# decoding moves off the event loop so it cannot stall other calls.
INLINE_DECODE_LIMIT = 4096


def python_decode_cost(received: ReceivedInferRequest) -> int:
    """Elements that decoding touches one by one; raw fixed-size tensors cost nothing."""
    request, raw = received.message, received.raw_inputs
    cost = 0
    raw_index = 0
    for tensor in request.inputs:
        in_region = REGION_PARAMETER in tensor.parameters
        if tensor.datatype == "BYTES":
            if in_region:  # its size is known only once read: decode it off the loop
                cost += INLINE_DECODE_LIMIT + 1
            elif raw_index < len(raw):
                cost += len(raw[raw_index])  # strings are split, checked and maybe tokenized
        if not in_region:
            raw_index += 1
        for _, values in tensor.contents.ListFields():
            cost += len(values)
    return cost


# Requested outputs that go to shared memory, by name.
OutputPlacements = dict[str, Placement]


def _parameter_values(tensor: Any) -> dict[str, Any]:
    return {key: decode_parameter(key, value) for key, value in tensor.parameters.items()}


def _input_placements(
    request: pb.ModelInferRequest, regions: SharedMemoryRegions
) -> list[Placement | None] | None:
    """Each input's shared memory window, or None when no input names one."""
    placements: list[Placement | None] | None = None
    for position, tensor in enumerate(request.inputs):
        if not tensor.parameters:
            continue
        placement = regions.placement(f"input '{tensor.name}'", _parameter_values(tensor))
        if placement is not None:
            if placements is None:
                placements = [None] * len(request.inputs)
            placements[position] = placement
    return placements


def _read_placed(
    where: str,
    placement: Placement,
    datatype: DataType,
    shape: list[int],
    regions: SharedMemoryRegions,
) -> bytes:
    """The tensor's bytes out of shared memory, after checking their size without reading."""
    if datatype.itemsize is not None:
        expected = element_count(shape) * datatype.itemsize
        if placement.byte_size != expected:
            raise InvalidInputError(
                f"{where}: shared_memory_byte_size is {placement.byte_size} but shape "
                f"{format_shape(shape)} of {datatype.name} needs {expected} bytes"
            )
    elif placement.byte_size > regions.max_tensor_bytes:
        raise RequestTooLargeError(
            f"{where}: shared_memory_byte_size {placement.byte_size} is over the "
            f"{regions.max_tensor_bytes} bytes this server accepts for one tensor "
            "(--max-message-bytes)"
        )
    return placement.read(where)


def decode_infer_request(
    received: ReceivedInferRequest,
    builder: RequestBuilder,
    received_ns: int,
    regions: SharedMemoryRegions,
) -> tuple[InferenceRequest, OutputPlacements]:
    """Decode and validate every input, then the requested outputs and parameters.

    Shared memory comes first: an input in a region has no raw_input_contents
    entry, so the entries can only be counted once the regions are known.
    """
    request, raw = received.message, received.raw_inputs
    placements = _input_placements(request, regions)
    inline = len(request.inputs)
    if placements is not None:
        inline -= sum(1 for placement in placements if placement is not None)
    if raw and len(raw) != inline:
        shared = len(request.inputs) - inline
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries but the request has {inline} inputs"
            + (f" not in shared memory ({shared} are)" if shared else "")
            + "; send one entry per input, in the order of inputs"
        )
    raw_index = 0
    for position, tensor in enumerate(request.inputs):
        spec, datatype = builder.check_input(
            position, tensor.name, tensor.datatype, list(tensor.shape)
        )
        where = f"input '{tensor.name}'"
        typed = tensor.contents.ListFields()
        placement = placements[position] if placements is not None else None
        if placement is not None or raw:
            if typed:
                source = "a shared memory region" if placement is not None else "raw_input_contents"
                raise InvalidInputError(
                    f"{where} has both {source} and typed contents; send one or the other"
                )
            if placement is not None:
                data: bytes | memoryview = _read_placed(
                    where, placement, datatype, list(tensor.shape), regions
                )
            else:
                data = raw[raw_index]
                raw_index += 1
            array = decode_raw(where, datatype, list(tensor.shape), data)
        else:
            array = _decode_typed(spec, datatype, list(tensor.shape), tensor.contents)
        builder.accept(spec, array)
    requested: list[str] = []
    output_placements: OutputPlacements = {}
    for output in request.outputs:
        if "classification" in output.parameters:
            raise UnsupportedError(
                f"output '{output.name}' asks for 'classification', which this server does "
                "not support"
            )
        if output.parameters:
            placement = regions.placement(f"output '{output.name}'", _parameter_values(output))
            if placement is not None:
                output_placements[output.name] = placement
        requested.append(output.name)
    core = builder.build(request.id, requested, received_ns, decode_request_parameters(request))
    return core, output_placements


def _decode_typed(
    spec: TensorSpec, datatype: DataType, shape: list[int], contents: pb.InferTensorContents
) -> np.ndarray:
    where = f"input '{spec.name}'"
    field = datatype.contents_field
    if field is None:
        raise InvalidInputError(
            f"{where} is {datatype.name}, which has no typed contents field; send it in "
            "raw_input_contents"
        )
    for descriptor, _ in contents.ListFields():
        if descriptor.name != field:
            raise InvalidInputError(
                f"{where} is {datatype.name}, so its values belong in contents.{field}, "
                f"not contents.{descriptor.name}"
            )
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInputError(
            f"{where} has {len(values)} values in contents.{field} but shape "
            f"{format_shape(shape)} needs {count}"
        )
    if datatype.is_bytes:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    wide: np.ndarray = np.array(values, dtype=_CONTENTS_DTYPES[field])
    target = datatype.numpy_dtype
    if np.issubdtype(target, np.integer) and wide.dtype != target:
        limits = np.iinfo(target)
        if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
            raise InvalidInputError(
                f"{where} has values outside the {datatype.name} range [{limits.min}, {limits.max}]"
            )
    return wide.astype(target, copy=False).reshape(shape)


def encode_infer_response(
    model_name: str,
    model_version: int,
    request_id: str,
    result: InferenceResult,
    placements: OutputPlacements | None = None,
) -> pb.ModelInferResponse:
    """The response; outputs asked for in shared memory are written there.

    raw_output_contents keeps one entry per output (empty for one in shared
    memory): clients find an output's bytes by its position.
    """
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=str(model_version), id=request_id
    )
    for output in result.outputs:
        tensor = response.outputs.add(
            name=output.name, datatype=output.datatype, shape=output.shape
        )
        placement = placements.get(output.name) if placements else None
        if placement is None:
            response.raw_output_contents.append(output.raw)
            continue
        placement.write(f"output '{output.name}'", output.raw)
        tensor.parameters[REGION_PARAMETER].string_param = placement.region.name
        tensor.parameters[SIZE_PARAMETER].int64_param = len(output.raw)
        if placement.offset:
            tensor.parameters[OFFSET_PARAMETER].int64_param = placement.offset
        response.raw_output_contents.append(b"")
    return response
