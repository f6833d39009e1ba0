"""ModelInferRequest off the wire, with raw tensor contents left where they arrived.

protobuf hands out each `raw_input_contents` entry as a new `bytes` copy. For an
image batch that is a copy of every pixel on the event loop, where every other
call waits for it (about a tenth of the loop's time per ResNet-sized request).
Large requests are therefore split first: the top level of the message is walked
on the wire, the `raw_input_contents` entries become `memoryview`s of the
received buffer (numpy reads them in place), and protobuf parses only the rest.
Any input the walk does not understand, or that has more top-level fields than a
real request, is parsed by protobuf whole: protobuf alone decides what is malformed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from ..protocol import grpc_service_pb2 as pb
from ..protowire import LENGTH_DELIMITED, walk

# ModelInferRequest.raw_input_contents (grpc_service.proto, field 7).
RAW_INPUT_CONTENTS_FIELD = 7
# Below this size the copies protobuf makes cost less than walking the message.
SPLIT_MIN_BYTES = 64 * 1024

# A real request has a handful of fields plus one per input, output and raw entry.
MAX_WALKED_FIELDS = 1024


@dataclass(frozen=True, slots=True)
class ReceivedInferRequest:
    """A ModelInferRequest as received: the message and its raw input contents."""

    message: pb.ModelInferRequest
    # One entry per input, in the order of message.inputs; empty when typed contents are used.
    raw_inputs: Sequence[bytes | memoryview]


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """A request body that does not parse as its message type.

    Deserializers return it instead of raising: gRPC Python answers an exception
    raised while deserializing with UNKNOWN and the exception's class name, where
    the client should learn that its message was invalid.
    """

    message_type: str
    reason: str

    def describe(self) -> str:
        return f"the request is not a valid {self.message_type} message: {self.reason}"


def tolerant(
    deserialize: Callable[[bytes], Any], message_type: str
) -> Callable[[bytes], Any | MalformedRequest]:
    """`deserialize`, returning a MalformedRequest where protobuf rejects the bytes."""

    def deserializer(data: bytes) -> Any | MalformedRequest:
        try:
            return deserialize(data)
        except DecodeError as error:
            # "Error parsing message with type 'X': <reason>": keep the reason.
            reason = str(error).rpartition(": ")[2] or "the bytes do not parse"
            return MalformedRequest(message_type, reason)

    return deserializer


def receive_infer_request(data: bytes) -> ReceivedInferRequest:
    """The gRPC request deserializer for ModelInfer and ModelStreamInfer (wrap in `tolerant`)."""
    if len(data) >= SPLIT_MIN_BYTES:
        try:
            rest, raw = split_raw_inputs(data)
        except ValueError:
            pass  # protobuf's parse below reports (or accepts) what the walk could not
        else:
            return ReceivedInferRequest(pb.ModelInferRequest.FromString(rest), raw)
    message = pb.ModelInferRequest.FromString(data)
    return ReceivedInferRequest(message, message.raw_input_contents)


def split_raw_inputs(data: bytes) -> tuple[bytes, list[memoryview]]:
    """Separate the raw_input_contents entries from the other top-level fields.

    Returns the other fields, re-joined in their order (a message protobuf parses
    to the same thing less those entries), and the entries as views of `data`.
    Raises ValueError on anything but well-formed fields of wire types 0, 1, 2, 5,
    and on more than MAX_WALKED_FIELDS fields.
    """
    view = memoryview(data)
    rest: list[memoryview] = []  # runs of other fields, each as one span
    raw: list[memoryview] = []
    run_start = 0
    for count, field in enumerate(walk(data), start=1):
        if count > MAX_WALKED_FIELDS:
            # Each field costs Python time on the event loop: a body of many tiny fields
            # is left to protobuf, which walks it in C.
            raise ValueError(f"more than {MAX_WALKED_FIELDS} top-level fields")
        if field.number != RAW_INPUT_CONTENTS_FIELD:
            continue
        if field.wire_type != LENGTH_DELIMITED:
            raise ValueError("raw_input_contents with a wire type other than bytes")
        if run_start < field.start:
            rest.append(view[run_start : field.start])
        raw.append(view[field.value : field.end])
        run_start = field.end
    if run_start < len(data):
        rest.append(view[run_start:])
    return b"".join(rest), raw
