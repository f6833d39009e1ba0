"""Messages between front-end processes and the engine, and the channel that carries them.

Headers only: tensor bytes stay in shared memory slabs (service.slabs) and a
message names their offsets. Messages are msgpack (msgspec) frames with a
4-byte length over a Unix socket, read and written by asyncio streams on each
side's event loop, chosen over pyzmq's asyncio sockets by measurement
(scripts/ipc_benchmark.py; the figures are in docs/performance.md).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any, Union

import msgspec

from .model_config import ModelSignature
from .text import TextInputConfig

_LENGTH = struct.Struct("<I")
# A header never comes near this; a larger length means a broken peer.
MAX_FRAME_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class CatalogVersion:
    """What a front end needs of a servable version to decode and check its requests."""

    name: str
    version: int
    label: str
    signature: ModelSignature
    text: TextInputConfig | None


@dataclass(frozen=True)
class CatalogModel:
    versions: dict[int, CatalogVersion]
    # The version a request that names none gets (the version policy's latest ready one).
    default: int | None


# TensorRef.datatype of a request's text tensor: length-prefixed UTF-8 in the slab.
TEXT = "text"


class TensorRef(msgspec.Struct, array_like=True):
    """A tensor in a slab: `nbytes` at `offset`.

    `datatype` is, for a request's input, the numpy dtype string of the checked
    array (or TEXT); for an answer's output, the protocol's datatype of the raw
    bytes the response carries.
    """

    name: str
    datatype: str
    shape: list[int]
    offset: int
    nbytes: int


class Hello(msgspec.Struct, tag=True, array_like=True):
    """Front end -> engine, first: who it is and the slab its requests come in."""

    frontend: int
    generation: int
    slab: str
    slab_bytes: int


class Welcome(msgspec.Struct, tag=True, array_like=True):
    """Engine -> front end: the slab its answers go to."""

    slab: str
    slab_bytes: int


class Catalog(msgspec.Struct, tag=True, array_like=True):
    """Engine -> front ends: the servable versions and what health reports.

    `versions` is a pickle of service.frontend's catalog entries: signatures and
    text settings, never tensors.
    """

    seq: int
    versions: bytes
    loading_done: bool
    all_ready: bool
    serving: dict[str, bool]


class Regions(msgspec.Struct, tag=True, array_like=True):
    """Engine -> front ends: the registered system shared memory regions."""

    seq: int
    regions: list[tuple[str, str, int, int]]


class Ack(msgspec.Struct, tag=True, array_like=True):
    seq: int


class Infer(msgspec.Struct, tag=True, array_like=True):
    """Front end -> engine: a decoded, validated request whose inputs are in the slab."""

    id: int
    model: str
    version: int
    inputs: list[TensorRef]
    outputs: list[str]
    parameters: dict[str, Any]
    request_id: str
    log_id: str
    received_ns: int
    deadline_ns: int
    batch_size: int
    alone: bool
    # The client named no version: if `version` was replaced on the way, the model's
    # current default may serve it, when its signature is the same.
    default_version: bool


class Answer(msgspec.Struct, tag=True, array_like=True):
    """Engine -> front end: the outputs of request `id`, in the answer slab, and the
    version that computed them."""

    id: int
    version: int
    outputs: list[TensorRef]


class Refusal(msgspec.Struct, tag=True, array_like=True):
    """Engine -> front end: request or call `id` failed with this status."""

    id: int
    status: str
    message: str


class Release(msgspec.Struct, tag=True, array_like=True):
    """Front end -> engine: these answer-slab allocations are read and free."""

    offsets: list[int]


class Call(msgspec.Struct, tag=True, array_like=True):
    """Front end -> engine: any other RPC, as its serialized request message."""

    id: int
    method: str
    request: bytes
    metadata: list[tuple[str, str]]


class Reply(msgspec.Struct, tag=True, array_like=True):
    id: int
    response: bytes


class Failure(msgspec.Struct, tag=True, array_like=True):
    """Front end -> engine: a request for this version failed before it was sent."""

    model: str
    version: int
    received_ns: int
    status: str


Message = Union[  # noqa: UP007  (msgspec needs the Union spelled out)
    Hello, Welcome, Catalog, Regions, Ack, Infer, Answer, Refusal, Release, Call, Reply, Failure
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class FrameTooLargeError(Exception):
    """A message over MAX_FRAME_BYTES: refused before it is written."""


class Channel:
    """One end of a front end <-> engine connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    def send(self, message: Message) -> None:
        """Queue a message; the transport writes it without blocking the loop."""
        body = _encoder.encode(message)
        if len(body) > MAX_FRAME_BYTES:
            raise FrameTooLargeError(f"a {type(message).__name__} message of {len(body)} bytes")
        self._writer.write(_LENGTH.pack(len(body)) + body)

    async def receive(self) -> Message | None:
        """The next message, or None when the peer has gone."""
        try:
            (length,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
            if length > MAX_FRAME_BYTES:
                raise ConnectionError(f"frame of {length} bytes from the peer")
            body = await self._reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return _decoder.decode(body)

    def close(self) -> None:
        self._writer.close()

    @property
    def closing(self) -> bool:
        return self._writer.is_closing()
