"""Walking protobuf's wire format field by field, without parsing messages.

Used where parsing would copy what only needs to be located: the raw tensor
bytes of a large ModelInferRequest (`grpc_api.wire`) and the operators of an
ONNX graph whose weights are hundreds of megabytes (`onnx_ops`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
MAX_FIELD_NUMBER = (1 << 29) - 1
# protobuf refuses tags and lengths encoded in more than 5 bytes; other varints take 10.
MAX_KEY_OR_LENGTH_BYTES = 5
_MAX_VARINT_BYTES = 10

Buffer = bytes | memoryview


@dataclass(frozen=True, slots=True)
class Field:
    """One field on the wire: where its key starts, where its value starts and ends.

    For LENGTH_DELIMITED fields `value` is past the length prefix, so
    `data[value:end]` is the payload (an embedded message, bytes or a string).
    """

    number: int
    wire_type: int
    start: int
    value: int
    end: int


def read_varint(data: Buffer, position: int, max_bytes: int) -> tuple[int, int]:
    """The varint at `position` and the position after it; ValueError if malformed."""
    value = 0
    for shift in range(0, 7 * max_bytes, 7):
        if position >= len(data):
            raise ValueError("truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
    raise ValueError(f"varint longer than {max_bytes} bytes")


def walk(data: Buffer, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """The fields of the message in `data[start:end]`, in order.

    Raises ValueError on anything but well-formed fields of wire types 0, 1, 2, 5.
    """
    end = len(data) if end is None else end
    position = start
    while position < end:
        field_start = position
        key, position = read_varint(data, position, MAX_KEY_OR_LENGTH_BYTES)
        number, wire_type = key >> 3, key & 7
        if number == 0 or number > MAX_FIELD_NUMBER:
            raise ValueError(f"invalid field number {number}")
        value = position
        if wire_type == VARINT:
            _, position = read_varint(data, position, _MAX_VARINT_BYTES)
        elif wire_type == FIXED64:
            position += 8
        elif wire_type == FIXED32:
            position += 4
        elif wire_type == LENGTH_DELIMITED:
            length, value = read_varint(data, position, MAX_KEY_OR_LENGTH_BYTES)
            position = value + length
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if position > end:
            raise ValueError("truncated field")
        yield Field(number, wire_type, field_start, value, position)
