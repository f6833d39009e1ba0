"""Splitting raw tensor contents out of a ModelInferRequest on the wire, against protobuf.

The split must give what protobuf gives for any input: the same message (less
the raw entries), the same entries in the same order, and a malformed request
wherever protobuf rejects the bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.grpc_api.wire import (
    SPLIT_MIN_BYTES,
    MalformedRequest,
    ReceivedInferRequest,
    receive_infer_request,
    split_raw_inputs,
    tolerant,
)
from service.protocol import grpc_service_pb2 as pb

NAMES = st.text(max_size=12)


@st.composite
def _chunks(draw: st.DrawFn) -> list[bytes]:
    """Serialized pieces of one request, each a few fields; joined they parse as one message."""
    pieces = []
    for _ in range(draw(st.integers(1, 8))):
        part = pb.ModelInferRequest()
        kind = draw(st.sampled_from(["header", "input", "output", "parameter", "raw"]))
        if kind == "header":
            part.model_name = draw(NAMES)
            part.model_version = draw(NAMES)
            part.id = draw(NAMES)
        elif kind == "input":
            tensor = part.inputs.add(name=draw(NAMES), datatype=draw(NAMES))
            tensor.shape.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4)))
            tensor.contents.int64_contents.extend(
                draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4))
            )
        elif kind == "output":
            part.outputs.add(name=draw(NAMES))
        elif kind == "parameter":
            part.parameters[draw(NAMES)].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        else:
            for size in draw(st.lists(st.integers(0, 3000), min_size=1, max_size=3)):
                part.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
        pieces.append(part.SerializeToString())
    return pieces


def _expected(data: bytes) -> tuple[pb.ModelInferRequest, list[bytes]]:
    message = pb.ModelInferRequest.FromString(data)
    raw = list(message.raw_input_contents)
    del message.raw_input_contents[:]
    return message, raw


def _same(received: ReceivedInferRequest, data: bytes) -> None:
    message, raw = _expected(data)
    assert [bytes(entry) for entry in received.raw_inputs] == raw
    got = pb.ModelInferRequest()
    got.CopyFrom(received.message)
    del got.raw_input_contents[:]
    assert got == message
    # Unknown fields too; map entries in key order (a map's own order is unspecified).
    assert got.SerializeToString(deterministic=True) == message.SerializeToString(
        deterministic=True
    )


LARGE_ENTRY = pb.ModelInferRequest(raw_input_contents=[bytes(SPLIT_MIN_BYTES)]).SerializeToString()


def _decided_as_protobuf_decides(data: bytes) -> None:
    """The server's deserializer on `data`: malformed exactly where protobuf refuses it."""
    received = tolerant(receive_infer_request, "inference.ModelInferRequest")(data)
    try:
        _expected(data)
    except Exception:
        assert isinstance(received, MalformedRequest)
        assert received.describe().startswith(
            "the request is not a valid inference.ModelInferRequest message: "
        )
        return
    assert isinstance(received, ReceivedInferRequest)
    _same(received, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_chunks())
@example(  # two parameters: protobuf may serialize a map in another order than it read it
    [b'"\x0f\n\t00101\xf0\xb0\x82\xbb\x12\x02\x10\x00', b'"\x0c\n\x0600001F\x12\x02\x10\x00']
)
def test_split_matches_protobuf_on_valid_messages(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    rest, raw = split_raw_inputs(data)
    _same(ReceivedInferRequest(pb.ModelInferRequest.FromString(rest), raw), data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _chunks(),
    st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=4),
    st.integers(0, 2**20),
)
def test_damaged_messages_fail_or_parse_as_protobuf_does(
    pieces: list[bytes], flips: list[tuple[int, int]], cut: int
) -> None:
    head = bytearray(b"".join(pieces))
    for offset, value in flips:
        if head:
            head[offset % len(head)] = value
    if cut % 3 == 0:  # a third of the time, cut short before the entry below
        del head[len(head) - cut % max(1, len(head)) :]
    # A large entry after the damage, so that the walk (not protobuf alone) reads it.
    _decided_as_protobuf_decides(bytes(head) + LARGE_ENTRY)


def test_large_raw_contents_are_views_of_the_received_bytes() -> None:
    request = pb.ModelInferRequest(model_name="m", id="i")
    request.inputs.add(name="a", datatype="FP32", shape=[1, SPLIT_MIN_BYTES // 4])
    request.inputs.add(name="b", datatype="UINT8", shape=[1, 3])
    request.raw_input_contents.extend([b"\x01" * SPLIT_MIN_BYTES, b"abc"])
    data = request.SerializeToString()
    received = receive_infer_request(data)
    assert all(isinstance(entry, memoryview) and entry.obj is data for entry in received.raw_inputs)
    assert [bytes(entry) for entry in received.raw_inputs] == [b"\x01" * SPLIT_MIN_BYTES, b"abc"]
    assert received.message.model_name == "m" and len(received.message.inputs) == 2
    assert not received.message.raw_input_contents


def test_small_requests_are_parsed_by_protobuf_alone() -> None:
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"xy"])
    received = receive_infer_request(request.SerializeToString())
    assert list(received.raw_inputs) == [b"xy"]
    assert received.message == request


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x3a\x05ab", "truncated field"),
        (b"\x38\x01", "raw_input_contents with a wire type other than bytes"),
        (b"\x0b", "unsupported wire type 3"),
        (b"\x00\x01", "invalid field number 0"),
        (b"\x0a\x10ab", "truncated field"),
        (b"\x08" + b"\xff" * 10, "varint longer than 10 bytes"),
        (b"\xba\x80\x80\x80\x80\x00\x00", "varint longer than 5 bytes"),  # field 7's tag
        (b"\x3a\x80\x80\x84\x80\x80\x00", "varint longer than 5 bytes"),  # its length
        (b"\x78\x00" * 1025, "more than 1024 top-level fields"),
        (b"\x08\xff", "truncated varint"),
    ],
)
def test_the_walk_refuses_what_it_does_not_understand(data: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        split_raw_inputs(data)


@pytest.mark.parametrize(
    "head",
    [
        # Field 7 as a varint: not bytes, so the walk gives up; protobuf decides.
        b"\x38\x01" + pb.ModelInferRequest(model_name="m").SerializeToString(),
        b"\xba\x80\x80\x80\x80\x00\x80\x80\x04",  # field 7's tag in 6 bytes
        b"\x3a\x80\x80\x84\x80\x80\x00",  # its length in 6 bytes
        b"\x78\x00" * 40_000,  # many tiny fields: protobuf walks them, not Python
        b"\x78\x00" * 1023,  # the most fields the walk takes, with the entry below
    ],
    ids=["field-7-varint", "long-tag", "long-length", "many-fields", "most-fields"],
)
def test_unusual_encodings_end_as_protobuf_decides(head: bytes) -> None:
    _decided_as_protobuf_decides(head + LARGE_ENTRY)
