"""Tensor element types and their binary encoding on the wire.

One table relates the four names a type goes by: the protocol's datatype string
("FP32"), the model configuration enum ("TYPE_FP32"), onnxruntime's type string
("tensor(float)") and the numpy dtype that carries the values in memory. The
raw encoding (little-endian, row-major; BYTES as 4-byte length-prefixed
elements) is shared by gRPC's raw_*_contents and the HTTP binary extension, so
it lives here in the core rather than in the grpc layer.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError


@dataclass(frozen=True)
class DataType:
    """Everything the server needs to know about one element type."""

    name: str
    config_name: str
    ort_type: str
    numpy_dtype: np.dtype
    itemsize: int | None
    contents_field: str | None

    @property
    def is_bytes(self) -> bool:
        return self.itemsize is None

    def __reduce__(self) -> tuple[object, tuple[str]]:
        """Unpickled (in a front-end process) as the same instance: compared by identity."""
        return (_named, (self.name,))


def _fixed(name: str, config: str, ort: str, dtype: str, contents: str | None) -> DataType:
    wire_dtype = np.dtype(dtype).newbyteorder("<")
    return DataType(name, config, ort, wire_dtype, wire_dtype.itemsize, contents)


# BF16 has no numpy dtype; its values travel as their raw 16-bit patterns.
DATATYPES: dict[str, DataType] = {
    dt.name: dt
    for dt in (
        _fixed("BOOL", "TYPE_BOOL", "tensor(bool)", "bool", "bool_contents"),
        _fixed("UINT8", "TYPE_UINT8", "tensor(uint8)", "uint8", "uint_contents"),
        _fixed("UINT16", "TYPE_UINT16", "tensor(uint16)", "uint16", "uint_contents"),
        _fixed("UINT32", "TYPE_UINT32", "tensor(uint32)", "uint32", "uint_contents"),
        _fixed("UINT64", "TYPE_UINT64", "tensor(uint64)", "uint64", "uint64_contents"),
        _fixed("INT8", "TYPE_INT8", "tensor(int8)", "int8", "int_contents"),
        _fixed("INT16", "TYPE_INT16", "tensor(int16)", "int16", "int_contents"),
        _fixed("INT32", "TYPE_INT32", "tensor(int32)", "int32", "int_contents"),
        _fixed("INT64", "TYPE_INT64", "tensor(int64)", "int64", "int64_contents"),
        _fixed("FP16", "TYPE_FP16", "tensor(float16)", "float16", None),
        _fixed("FP32", "TYPE_FP32", "tensor(float)", "float32", "fp32_contents"),
        _fixed("FP64", "TYPE_FP64", "tensor(double)", "float64", "fp64_contents"),
        _fixed("BF16", "TYPE_BF16", "tensor(bfloat16)", "uint16", None),
        DataType(
            "BYTES", "TYPE_STRING", "tensor(string)", np.dtype(object), None, "bytes_contents"
        ),
    )
}
BY_CONFIG_NAME = {dt.config_name: dt for dt in DATATYPES.values()}
BY_ORT_TYPE = {dt.ort_type: dt for dt in DATATYPES.values()}

_LENGTH_PREFIX = struct.Struct("<I")


def _named(name: str) -> DataType:
    return DATATYPES[name]


def lookup(datatype: str, tensor: str) -> DataType:
    """The DataType named by a request, or an error naming the tensor."""
    found = DATATYPES.get(datatype)
    if found is None:
        known = ", ".join(DATATYPES)
        raise InvalidInputError(f"{tensor}: unknown datatype '{datatype}'; expected one of {known}")
    return found


def format_shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def decode_raw(
    tensor: str, datatype: DataType, shape: Sequence[int], raw: bytes | memoryview
) -> np.ndarray:
    """Decode one raw tensor, checking its length against shape × element size.

    Fixed-size types are returned as a read-only view of `raw` (no copy),
    except BOOL, which is normalised to 0/1. BYTES gives an object array of
    `bytes`.
    """
    count = element_count(shape)
    if datatype.itemsize is None:
        elements = split_length_prefixed(tensor, raw, count)
        array = np.empty(count, dtype=object)
        array[:] = elements
        return array.reshape(shape)
    expected = count * datatype.itemsize
    if len(raw) != expected:
        raise InvalidInputError(
            f"{tensor}: raw content has {len(raw)} bytes but shape {format_shape(shape)} "
            f"of {datatype.name} needs {expected} bytes"
        )
    array = np.frombuffer(raw, dtype=datatype.numpy_dtype).reshape(shape)
    if datatype.name == "BOOL":
        array = array.view(np.uint8) != 0
    return array


def split_length_prefixed(tensor: str, raw: bytes | memoryview, count: int) -> list[bytes]:
    """Split a BYTES payload into exactly `count` elements or say what is wrong."""
    if count > len(raw) // _LENGTH_PREFIX.size:
        raise InvalidInputError(
            f"{tensor}: BYTES content of {len(raw)} bytes cannot hold {count} elements "
            f"(each needs at least a 4-byte length prefix)"
        )
    elements: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    for index in range(count):
        if offset + _LENGTH_PREFIX.size > len(raw):
            raise InvalidInputError(
                f"{tensor}: BYTES content ends before element {index} of {count}"
            )
        (length,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += _LENGTH_PREFIX.size
        if offset + length > len(raw):
            raise InvalidInputError(
                f"{tensor}: BYTES element {index} declares {length} bytes but only "
                f"{len(raw) - offset} remain"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(raw):
        raise InvalidInputError(
            f"{tensor}: BYTES content has {len(raw) - offset} bytes left over after "
            f"{count} elements; the shape and the payload disagree"
        )
    return elements


def join_length_prefixed(elements: Iterable[object]) -> bytes:
    """Encode BYTES elements (bytes, or str as UTF-8) with 4-byte length prefixes."""
    parts: list[bytes] = []
    for element in elements:
        data = element.encode("utf-8") if isinstance(element, str) else bytes(element)  # type: ignore[call-overload]
        parts.append(_LENGTH_PREFIX.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def encode_raw(datatype: DataType, array: np.ndarray) -> bytes:
    """The raw wire encoding of an output tensor."""
    if datatype.is_bytes:
        return join_length_prefixed(array.reshape(-1))
    return np.ascontiguousarray(array, dtype=datatype.numpy_dtype).tobytes()
