"""Conversion between inference protocol messages and the core's request/result types."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..datatypes import DataType, decode_raw, element_count, format_shape
from ..errors import InvalidInputError, UnsupportedError
from ..inference import InferenceRequest, InferenceResult, RequestBuilder
from ..model_config import TensorSpec
from ..protocol import grpc_service_pb2 as pb
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
    for position, tensor in enumerate(request.inputs):
        if tensor.datatype == "BYTES" and position < len(raw):
            cost += len(raw[position])  # strings are split, checked and maybe tokenized
        for _, values in tensor.contents.ListFields():
            cost += len(values)
    return cost


def decode_infer_request(
    received: ReceivedInferRequest, builder: RequestBuilder, received_ns: int
) -> InferenceRequest:
    """Decode and validate every input, then the requested outputs and parameters."""
    request, raw = received.message, received.raw_inputs
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries but the request has "
            f"{len(request.inputs)} inputs; send one entry per input, in the order of inputs"
        )
    for position, tensor in enumerate(request.inputs):
        if "shared_memory_region" in tensor.parameters:
            raise UnsupportedError(
                f"input '{tensor.name}' refers to a shared memory region; this server does not "
                "support shared memory"
            )
        spec, datatype = builder.check_input(
            position, tensor.name, tensor.datatype, list(tensor.shape)
        )
        typed = tensor.contents.ListFields()
        if raw:
            if typed:
                raise InvalidInputError(
                    f"input '{tensor.name}' has both raw_input_contents and typed contents; "
                    "send one or the other"
                )
            array = decode_raw(
                f"input '{tensor.name}'", datatype, list(tensor.shape), raw[position]
            )
        else:
            array = _decode_typed(spec, datatype, list(tensor.shape), tensor.contents)
        builder.accept(spec, array)
    requested: list[str] = []
    for output in request.outputs:
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in output.parameters:
                raise UnsupportedError(
                    f"output '{output.name}' asks for '{unsupported}', which this server does "
                    "not support"
                )
        requested.append(output.name)
    return builder.build(request.id, requested, received_ns, decode_request_parameters(request))


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
    model_name: str, model_version: int, request_id: str, result: InferenceResult
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=str(model_version), id=request_id
    )
    for output in result.outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
    response.raw_output_contents.extend(output.raw for output in result.outputs)
    return response
