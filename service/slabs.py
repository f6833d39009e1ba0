"""Shared memory slabs between a front-end process and the engine, and their allocator.

Each front end writes request tensors into its own slab and the engine writes
answers into another one per front end, so a tensor crosses processes with
one copy in and one copy out and no pickling. A slab is a POSIX shared memory
object named under the server's reserved prefix; it is unlinked as soon as
both processes have mapped it, so a crash leaves nothing behind in /dev/shm
(the supervisor also sweeps its own prefix when it exits).
"""

from __future__ import annotations

import bisect
import mmap
import os
from pathlib import Path

import numpy as np

from .shared_memory import RESERVED_KEY_PREFIX, SHM_ROOT

# Allocations start on cache-line boundaries: numpy and onnxruntime read them faster.
ALIGNMENT = 64


def slab_prefix(supervisor_pid: int) -> str:
    """Every slab of one server starts with this: what the supervisor sweeps."""
    return f"{RESERVED_KEY_PREFIX}-{supervisor_pid}-"


class SlabError(Exception):
    """A slab could not be set aside (usually: /dev/shm is too small)."""


class Slab:
    """One mapped shared memory object."""

    def __init__(self, name: str, size: int, create: bool) -> None:
        try:
            self._open(name, size, create)
        except OSError as error:
            if create:
                Path(SHM_ROOT / name).unlink(missing_ok=True)
            raise SlabError(
                f"cannot set aside {size} bytes of shared memory in {SHM_ROOT} ({error.strerror}); "
                "lower --frontend-slab-bytes, give the container more shared memory (Docker "
                "shm_size), or run in one process (--frontend-processes 0)"
            ) from None

    def _open(self, name: str, size: int, create: bool) -> None:
        self.name = name
        self.size = size
        path = SHM_ROOT / name
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                # Reserved now: tmpfs that runs out later would kill a writer with SIGBUS.
                os.posix_fallocate(fd, 0, size)
            elif os.fstat(fd).st_size < size:
                raise ValueError(f"shared memory slab {name} is smaller than {size} bytes")
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.view = memoryview(self._map)
        self.bytes = np.frombuffer(self._map, dtype=np.uint8)

    def unlink(self) -> None:
        """Remove the name; the mapping stays valid in every process that has it."""
        Path(SHM_ROOT / self.name).unlink(missing_ok=True)

    def write(self, offset: int, data: bytes | memoryview | np.ndarray) -> None:
        source = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        flat = source.reshape(-1).view(np.uint8)
        self.bytes[offset : offset + flat.size] = flat

    def read(self, offset: int, size: int) -> bytes:
        return self._map[offset : offset + size]

    def array(self, offset: int, size: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A view of the slab (no copy); valid while the allocation is held."""
        return np.frombuffer(
            self._map, dtype=dtype, count=size // dtype.itemsize, offset=offset
        ).reshape(shape)


class SlabAllocator:
    """First-fit allocation of byte ranges in a slab, with neighbours merged on free.

    Used from one event loop thread only. Requests are short-lived and few at a
    time (bounded by the server's in-flight limits), so the free list stays short.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free_starts: list[int] = [0]  # sorted
        self._free_sizes: dict[int, int] = {0: size}
        self._used: dict[int, int] = {}
        self.used_bytes = 0

    def allocate(self, size: int) -> int | None:
        """The offset of `size` free bytes, or None when none are left in one piece."""
        size = max(ALIGNMENT, -(-size // ALIGNMENT) * ALIGNMENT)
        for index, start in enumerate(self._free_starts):
            free = self._free_sizes[start]
            if free < size:
                continue
            del self._free_sizes[start]
            if free == size:
                del self._free_starts[index]
            else:
                self._free_starts[index] = start + size
                self._free_sizes[start + size] = free - size
            self._used[start] = size
            self.used_bytes += size
            return start
        return None

    def free(self, offset: int) -> None:
        size = self._used.pop(offset, None)
        if size is None:
            return  # freed already (a front end that restarted, a duplicate release)
        self.used_bytes -= size
        index = bisect.bisect_left(self._free_starts, offset)
        end = offset + size
        if index < len(self._free_starts) and self._free_starts[index] == end:
            size += self._free_sizes.pop(end)  # merge with the free range after
            del self._free_starts[index]
        if index > 0:
            before = self._free_starts[index - 1]
            if before + self._free_sizes[before] == offset:  # merge with the one before
                self._free_sizes[before] += size
                return
        self._free_starts.insert(index, offset)
        self._free_sizes[offset] = size
