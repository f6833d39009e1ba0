"""Protocol messages in and out of JSON, as Triton's HTTP endpoint writes and reads them.

protobuf's own JSON mapping writes 64-bit integers as strings and leaves out
fields that hold their default; tritonclient, perf_analyzer and the KServe
clients read numbers, and expect `max_batch_size: 0` or `count: 0` to be
there. So every scalar and list is written, 64-bit integers as numbers and
enums by name; an unset sub-message is left out.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ..errors import InvalidInputError
from ..protocol import grpc_service_pb2 as pb

_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


def message_to_json(message: Message) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            fields[field.name] = {key: _value(value_field, item) for key, item in value.items()}
        elif field.is_repeated:
            fields[field.name] = [_value(field, item) for item in value]
        elif entry is not None or field.containing_oneof is not None:
            if message.HasField(field.name):
                fields[field.name] = _value(field, value)
        else:
            fields[field.name] = _value(field, value)
    return fields


def _value(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == pb.InferParameter.DESCRIPTOR.full_name:
            return parameter_to_json(value)
        return message_to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    return value


def parameter_to_json(parameter: pb.InferParameter) -> Any:
    """An InferParameter is written as its bare value, as in the HTTP protocol."""
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def parameter_from_json(where: str, value: Any, target: Message | None = None) -> pb.InferParameter:
    """A JSON parameter value as the parameter message gRPC would have carried: an
    InferParameter, or `target` (a ModelRepositoryParameter has no double or uint64)."""
    parameter: Any = pb.InferParameter() if target is None else target
    fields = parameter.DESCRIPTOR.fields_by_name
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX:
        parameter.int64_param = value
    elif isinstance(value, int) and 0 <= value <= _UINT64_MAX and "uint64_param" in fields:
        parameter.uint64_param = value
    elif isinstance(value, int):
        raise InvalidInputError(f"{where} is {value}, outside the 64-bit integer range")
    elif isinstance(value, float) and "double_param" in fields:
        parameter.double_param = value
    elif isinstance(value, str):
        parameter.string_param = value
    else:
        expected = (
            "booleans, numbers or strings"
            if "double_param" in fields
            else ("booleans, integers or strings")
        )
        raise InvalidInputError(f"{where} is a JSON {json_kind(value)}; parameters are {expected}")
    return parameter  # type: ignore[no-any-return]


def json_kind(value: Any) -> str:
    """What a decoded JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
