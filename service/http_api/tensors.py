"""The infer endpoint's body: JSON tensors and Triton's binary tensor extension.

A request becomes the ModelInferRequest gRPC would have carried, with every
inline tensor in raw form, so that one decoder (grpc_api.codec) checks it
against the model and HTTP requests batch with gRPC ones. Binary tensors are
slices of the received body; JSON `data` is checked against the datatype here,
where its JSON types are still known, and encoded once.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from ..datatypes import (
    DATATYPES,
    DataType,
    element_count,
    format_shape,
    join_length_prefixed,
    lookup,
    split_length_prefixed,
)
from ..errors import InvalidInputError
from ..grpc_api.wire import ReceivedInferRequest
from ..protocol import grpc_service_pb2 as pb
from ..shared_memory import REGION_PARAMETER
from .messages import json_kind, parameter_from_json

HEADER_LENGTH = "inference-header-content-length"
BINARY_SIZE = "binary_data_size"
# Per requested output, and for all outputs of a request: answer in binary rather than JSON.
BINARY_OUTPUT = "binary_data"
BINARY_OUTPUTS = "binary_data_output"
# A BYTES tensor whose JSON strings are base64 (any bytes), not text.
CONTENT_TYPE = "content_type"
BASE64 = "base64"
_INT64_MAX = 2**63 - 1
# What numpy makes of JSON values, by datatype: which array kinds each accepts.
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_KIND_WORDS = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers", "U": "strings"}


@dataclass(frozen=True)
class HttpInferRequest:
    received: ReceivedInferRequest
    # Requested outputs that said binary_data true or false.
    binary_outputs: dict[str, bool]
    # binary_data_output: outputs that said nothing are answered in binary.
    binary_by_default: bool


def split_body(body: memoryview, header_length: str | None) -> tuple[memoryview, memoryview]:
    """The JSON part and the binary part that follows it."""
    if header_length is None:
        return body, body[len(body) :]
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidInputError(
            f"header Inference-Header-Content-Length is '{header_length[:40]}'; expected the "
            "length in bytes of the JSON at the start of the body"
        )
    length = int(text)
    if length > len(body):
        raise InvalidInputError(
            f"header Inference-Header-Content-Length says {length} bytes of JSON but the body "
            f"has {len(body)} bytes"
        )
    return body[:length], body[length:]


def decode_json_object(what: str, text: memoryview | bytes) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as error:
        raise InvalidInputError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object, not a JSON {json_kind(value)}")
    return value


def _field(where: str, document: dict[str, Any], key: str, kind: type, required: bool) -> Any:
    value = document.get(key)
    if value is None:
        if required:
            raise InvalidInputError(f"{where} has no '{key}'")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {str: "a string", list: "an array", dict: "an object", int: "an integer"}
        raise InvalidInputError(
            f"{where}: '{key}' must be {expected[kind]}, not a JSON {json_kind(value)}"
        )
    return value


def _parameters(where: str, given: dict[str, Any] | None, skip: Sequence[str]) -> Any:
    parameters = {}
    for key, value in (given or {}).items():
        if key not in skip:
            parameters[key] = parameter_from_json(f"{where} parameter '{key}'", value)
    return parameters


def parse_infer_request(
    model: str, version: str, body: memoryview, header_length: str | None
) -> HttpInferRequest:
    """Raises InvalidInputError naming the field at fault."""
    json_part, binary = split_body(body, header_length)
    document = decode_json_object("the request body", json_part)
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.id = _field("the request", document, "id", str, False) or ""
    top = _field("the request", document, "parameters", dict, False) or {}
    binary_by_default = top.get(BINARY_OUTPUTS, False)
    if not isinstance(binary_by_default, bool):
        raise InvalidInputError(f"parameter '{BINARY_OUTPUTS}' must be true or false")
    for key, parameter in _parameters("request", top, (BINARY_OUTPUTS,)).items():
        request.parameters[key].CopyFrom(parameter)
    inputs = _field("the request", document, "inputs", list, True)
    raw: list[bytes | memoryview] = []
    offset = 0
    for position, entry in enumerate(inputs):
        data, offset = _parse_input(request, position, entry, binary, offset)
        if data is not None:
            raw.append(data)
    if offset != len(binary):
        raise InvalidInputError(
            f"the body has {len(binary) - offset} bytes after the JSON and the inputs' "
            f"'{BINARY_SIZE}' parameters that no input accounts for"
        )
    binary_outputs: dict[str, bool] = {}
    for position, entry in enumerate(_field("the request", document, "outputs", list, False) or []):
        where = f"outputs[{position}]"
        if not isinstance(entry, dict):
            raise InvalidInputError(f"{where} must be a JSON object, not a JSON {json_kind(entry)}")
        name = _field(where, entry, "name", str, True)
        given = _field(f"output '{name}'", entry, "parameters", dict, False) or {}
        output = request.outputs.add(name=name)
        choice = given.get(BINARY_OUTPUT)
        if choice is not None:
            if not isinstance(choice, bool):
                raise InvalidInputError(
                    f"output '{name}' parameter '{BINARY_OUTPUT}' must be true or false"
                )
            binary_outputs[name] = choice
        for key, parameter in _parameters(f"output '{name}'", given, (BINARY_OUTPUT,)).items():
            output.parameters[key].CopyFrom(parameter)
    return HttpInferRequest(ReceivedInferRequest(request, raw), binary_outputs, binary_by_default)


def _parse_input(
    request: pb.ModelInferRequest, position: int, entry: Any, binary: memoryview, offset: int
) -> tuple[bytes | memoryview | None, int]:
    """Adds the input to `request`; returns its raw bytes (None when in shared memory) and
    where the next input's binary data starts."""
    if not isinstance(entry, dict):
        raise InvalidInputError(
            f"inputs[{position}] must be a JSON object, not a JSON {json_kind(entry)}"
        )
    name = _field(f"inputs[{position}]", entry, "name", str, True)
    where = f"input '{name}'"
    datatype = _field(where, entry, "datatype", str, True)
    shape = _field(where, entry, "shape", list, True)
    if not all(
        isinstance(dim, int) and not isinstance(dim, bool) and 0 <= dim <= _INT64_MAX
        for dim in shape
    ):
        raise InvalidInputError(
            f"{where} has shape {str(shape)[:80]}; dimensions are non-negative integers"
        )
    given = _field(where, entry, "parameters", dict, False) or {}
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    for key, parameter in _parameters(where, given, (BINARY_SIZE, CONTENT_TYPE)).items():
        tensor.parameters[key].CopyFrom(parameter)
    data = entry.get("data")
    size = given.get(BINARY_SIZE)
    if size is not None:
        if data is not None:
            raise InvalidInputError(
                f"{where} has both 'data' and parameter '{BINARY_SIZE}'; send one or the other"
            )
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInputError(
                f"{where} parameter '{BINARY_SIZE}' must be a non-negative integer"
            )
        if offset + size > len(binary):
            raise InvalidInputError(
                f"{where} has '{BINARY_SIZE}' {size} but only {len(binary) - offset} bytes of "
                "binary data remain in the body"
            )
        return binary[offset : offset + size], offset + size
    if REGION_PARAMETER in given:
        if data is not None:
            raise InvalidInputError(
                f"{where} has both 'data' and a shared memory region; send one or the other"
            )
        return None, offset
    if data is None:
        raise InvalidInputError(
            f"{where} has no 'data', no '{BINARY_SIZE}' parameter and no shared memory region"
        )
    base64_strings = given.get(CONTENT_TYPE) == BASE64
    return json_tensor_raw(where, lookup(datatype, where), shape, data, base64_strings), offset


def json_tensor_raw(
    where: str, datatype: DataType, shape: list[int], data: Any, base64_strings: bool = False
) -> bytes:
    """A tensor's JSON `data` (flat, or nested as its shape) in raw wire encoding."""
    values = _flatten(where, data, shape)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInputError(
            f"{where} has {len(values)} values in 'data' but shape {format_shape(shape)} needs "
            f"{count}"
        )
    if datatype.is_bytes:
        return join_length_prefixed(_strings(where, values, base64_strings))
    if datatype.name == "BF16":
        raise InvalidInputError(f"{where} is BF16, which JSON cannot carry; send it as binary data")
    target = datatype.numpy_dtype
    try:
        array = np.array(values)
    except (ValueError, OverflowError):
        raise InvalidInputError(f"{where}: 'data' holds values that are not all numbers") from None
    accepted = _ACCEPTED_KINDS[target.kind]
    if target.kind in "iu" and array.dtype.kind in "fO" and all(type(v) is int for v in values):
        # Integers no single numpy type holds (UINT64 above 2**63 beside negatives).
        _check_range(where, datatype, min(values), max(values))
        return np.array(values, dtype=target).tobytes()
    if array.size and array.dtype.kind not in accepted:
        found = _KIND_WORDS.get(array.dtype.kind, "values of mixed types")
        raise InvalidInputError(
            f"{where} is {datatype.name} but its 'data' holds {found}; expected "
            f"{_KIND_WORDS[target.kind]}"
        )
    if array.size and target.kind in "iu":
        _check_range(where, datatype, int(array.min()), int(array.max()))
    return array.astype(target, copy=False).tobytes()


def _check_range(where: str, datatype: DataType, low: int, high: int) -> None:
    limits = np.iinfo(datatype.numpy_dtype)
    if low < limits.min or high > limits.max:
        raise InvalidInputError(
            f"{where} has values outside the {datatype.name} range [{limits.min}, {limits.max}]"
        )


def _flatten(where: str, data: Any, shape: list[int]) -> list[Any]:
    """Row-major values: a flat array, or arrays nested exactly as the shape."""
    if not isinstance(data, list):
        raise InvalidInputError(f"{where}: 'data' must be an array, not a JSON {json_kind(data)}")
    if not data or not isinstance(data[0], list):
        for value in data:
            if isinstance(value, (list, dict)):
                raise InvalidInputError(
                    f"{where}: 'data' mixes arrays and values; send it flat or nested as the shape"
                )
        return data
    flat: list[Any] = []

    def walk(level: Any, depth: int) -> None:
        if depth < len(shape) - 1:
            if not isinstance(level, list) or len(level) != shape[depth]:
                raise InvalidInputError(
                    f"{where}: nested 'data' does not match shape {format_shape(shape)} at "
                    f"dimension {depth}"
                )
            for item in level:
                walk(item, depth + 1)
            return
        if (
            not isinstance(level, list)
            or len(level) != shape[depth]
            or any(isinstance(value, (list, dict)) for value in level)
        ):
            raise InvalidInputError(
                f"{where}: nested 'data' does not match shape {format_shape(shape)} at "
                f"dimension {depth}"
            )
        flat.extend(level)

    if not shape:
        raise InvalidInputError(f"{where}: nested 'data' for a tensor of shape []")
    walk(data, 0)
    return flat


def _strings(where: str, values: list[Any], base64_strings: bool) -> list[bytes]:
    elements: list[bytes] = []
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise InvalidInputError(
                f"{where} is BYTES, so 'data' holds strings; element {index} is a JSON "
                f"{json_kind(value)}"
            )
        if base64_strings:
            try:
                elements.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise InvalidInputError(
                    f"{where} element {index} is not base64 ('{CONTENT_TYPE}' is '{BASE64}')"
                ) from None
        else:
            elements.append(value.encode("utf-8", errors="surrogatepass"))
    return elements


def encode_infer_response(
    response: pb.ModelInferResponse, request: HttpInferRequest
) -> tuple[dict[str, Any], list[bytes]]:
    """The JSON part of the answer and the binary outputs that follow it, in order."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if REGION_PARAMETER in tensor.parameters:
            pass  # written to the client's region; clients read a 'parameters' as binary data
        elif request.binary_outputs.get(tensor.name, request.binary_by_default):
            entry["parameters"] = {BINARY_SIZE: len(raw)}
            chunks.append(raw)
        else:
            data, base64_strings = json_tensor_data(DATATYPES[tensor.datatype], raw)
            if base64_strings:
                entry["parameters"] = {CONTENT_TYPE: BASE64}
            entry["data"] = data
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        document["id"] = response.id
    document["outputs"] = outputs
    return document, chunks


def json_output_bytes(response: pb.ModelInferResponse, request: HttpInferRequest) -> int:
    """How much output the answer writes as JSON values (the costly part of encoding it)."""
    total = 0
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if not request.binary_outputs.get(tensor.name, request.binary_by_default):
            total += len(raw)
    return total


def json_tensor_data(datatype: DataType, raw: bytes) -> tuple[list[Any], bool]:
    """A raw output as a flat JSON array; BYTES that are not all UTF-8 go as base64
    (the second value says so)."""
    if datatype.is_bytes:
        elements = split_length_prefixed("output", raw, _count_prefixed(raw))
        try:
            return [element.decode("utf-8") for element in elements], False
        except UnicodeDecodeError:
            return [base64.b64encode(element).decode("ascii") for element in elements], True
    array = np.frombuffer(raw, dtype=datatype.numpy_dtype)
    if datatype.name == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    values: list[Any] = array.tolist()
    return values, False


def _count_prefixed(raw: bytes) -> int:
    """How many length-prefixed elements a BYTES output holds (the server wrote it)."""
    count = offset = 0
    while offset < len(raw):
        offset += 4 + int.from_bytes(raw[offset : offset + 4], "little")
        count += 1
    return count
