"""Round trips of a front end's request header to another process: what carries them best.

    pip install pyzmq        # only for the comparison; the server does not use it
    python scripts/ipc_benchmark.py

Each candidate echoes a msgspec-encoded header the size of an inference request's
(model name, one tensor's shape and offset) from a server process, on uvloop in
both processes, as the front ends and the engine run: pyzmq's asyncio DEALER/ROUTER
sockets over ipc://, and asyncio streams over a Unix socket with 4-byte length
frames (what service/ipc.py does). Prints round trips per second with one
outstanding and with 32 outstanding, the best of three runs each.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import uvloop

TRIPS = 20_000
LENGTH = struct.Struct("<I")


class Header(msgspec.Struct, array_like=True):
    id: int
    model: str
    shape: list[int]
    offset: int


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Header)


def header(number: int) -> bytes:
    return encoder.encode(Header(number, "mnist_cnn", [1, 1, 28, 28], 123_456))


def zmq_server(address: str) -> None:
    import zmq
    import zmq.asyncio

    async def main() -> None:
        socket = zmq.asyncio.Context().socket(zmq.ROUTER)
        socket.bind(address)
        while True:
            identity, body = await socket.recv_multipart()
            await socket.send_multipart([identity, encoder.encode(decoder.decode(body))])

    uvloop.run(main())


async def zmq_client(address: str, outstanding: int) -> float:
    import zmq
    import zmq.asyncio

    socket = zmq.asyncio.Context().socket(zmq.DEALER)
    socket.connect(address)
    waiting: dict[int, asyncio.Future[None]] = {}

    async def read() -> None:
        while True:
            waiting.pop(decoder.decode(await socket.recv()).id).set_result(None)

    async def send(number: int) -> None:
        await socket.send(header(number))

    return await _drive(read, send, waiting, outstanding)


def unix_server(path: str) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                (size,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
                body = encoder.encode(decoder.decode(await reader.readexactly(size)))
                writer.write(LENGTH.pack(len(body)) + body)

    async def main() -> None:
        server = await asyncio.start_unix_server(serve, path)
        await server.serve_forever()

    uvloop.run(main())


async def unix_client(path: str, outstanding: int) -> float:
    reader, writer = await asyncio.open_unix_connection(path)
    waiting: dict[int, asyncio.Future[None]] = {}

    async def read() -> None:
        while True:
            (size,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
            waiting.pop(decoder.decode(await reader.readexactly(size)).id).set_result(None)

    async def send(number: int) -> None:
        body = header(number)
        writer.write(LENGTH.pack(len(body)) + body)

    try:
        return await _drive(read, send, waiting, outstanding)
    finally:
        writer.close()


async def _drive(
    read: Callable[[], Coroutine[Any, Any, None]],
    send: Callable[[int], Awaitable[None]],
    waiting: dict[int, asyncio.Future[None]],
    outstanding: int,
) -> float:
    loop = asyncio.get_running_loop()
    reader = asyncio.create_task(read())
    numbers = iter(range(TRIPS))

    async def worker() -> None:
        for number in numbers:
            waiting[number] = loop.create_future()
            await send(number)
            await waiting[number]

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(outstanding)))
    elapsed = time.perf_counter() - started
    reader.cancel()
    return TRIPS / elapsed


def main() -> int:
    scratch = Path(tempfile.mkdtemp())
    candidates = (
        ("pyzmq asyncio, ipc://", zmq_server, zmq_client, f"ipc://{scratch}/zmq"),
        ("asyncio Unix socket", unix_server, unix_client, str(scratch / "unix")),
    )
    spawn = multiprocessing.get_context("spawn")
    for label, serve, drive, address in candidates:
        server = spawn.Process(target=serve, args=(address,), daemon=True)
        server.start()
        time.sleep(1.0)
        for outstanding in (1, 32):
            best = max(uvloop.run(drive(address, outstanding)) for _ in range(3))
            print(
                f"{label:24} {outstanding:2} outstanding: {best:9,.0f} round trips/s "
                f"({1e6 / best:6.1f} µs each)"
            )
        server.terminate()
        server.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
