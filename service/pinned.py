"""Page-locked ("pinned") host memory from the CUDA runtime, for GPU staging buffers.

The GPU copies a batch from page-locked memory by DMA; from ordinary (pageable)
memory the driver first copies it again through a small pinned bounce buffer,
at a fraction of the speed. onnxruntime's Python API cannot allocate pinned
memory, but it copies from whatever host address it is bound to, so a merged
batch written into memory from `cudaHostAlloc` reaches the GPU the fast way.

The CUDA runtime library is the one onnxruntime's CUDA provider has already
loaded into the process (read from /proc/self/maps), so no second CUDA version
is brought in. Everything here fails soft: `PinnedAllocator.open` returns None
with the reason, and the caller keeps pageable memory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_CUDA_SUCCESS = 0
_HOST_ALLOC_PORTABLE = 1  # pinned for every CUDA context, whichever GPU runs the model
_CUDART = re.compile(r"\s(/\S*/libcudart\.so[\d.]*)$")
_FALLBACK_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


def _loaded_cudart() -> list[str]:
    """Paths of the CUDA runtime libraries already mapped into this process."""
    try:  # mapped file names need not be UTF-8 (a model folder's, say)
        maps = os.fsdecode(Path("/proc/self/maps").read_bytes())
    except OSError:
        return []
    found = (_CUDART.search(line) for line in maps.splitlines())
    return list(dict.fromkeys(match.group(1) for match in found if match))


class PinnedBlock:
    """One cudaHostAlloc'd block; freed when the last numpy view of it goes away."""

    def __init__(self, allocator: PinnedAllocator, pointer: int, nbytes: int) -> None:
        self._allocator = allocator
        self._pointer = pointer
        self.nbytes = nbytes
        # numpy keeps this object as the array's base, so the block lives as long as any view.
        self.__array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (pointer, False),
            "version": 3,
        }

    def __del__(self) -> None:
        self._allocator.free(self._pointer)


class PinnedAllocator:
    """Allocates pinned host memory as uint8 numpy arrays."""

    def __init__(self, library: Any, path: str) -> None:
        self._library = library
        self.path = path
        library.cudaHostAlloc.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_size_t,
            ctypes.c_uint,
        ]
        library.cudaHostAlloc.restype = ctypes.c_int
        library.cudaFreeHost.argtypes = [ctypes.c_void_p]
        library.cudaFreeHost.restype = ctypes.c_int
        library.cudaSetDevice.argtypes = [ctypes.c_int]
        library.cudaSetDevice.restype = ctypes.c_int
        library.cudaGetErrorString.argtypes = [ctypes.c_int]
        library.cudaGetErrorString.restype = ctypes.c_char_p

    @classmethod
    def open(cls) -> tuple[PinnedAllocator | None, str]:
        """The allocator over the process's CUDA runtime, or None and why not."""
        candidates = _loaded_cudart() or list(_FALLBACK_NAMES)
        problems = []
        for path in candidates:
            try:
                library = ctypes.CDLL(path)
                return cls(library, path), ""
            except Exception as error:  # OSError, AttributeError for a symbol it lacks, ...
                problems.append(f"{path}: {error}")
        return None, "no CUDA runtime library could be opened (" + "; ".join(problems) + ")"

    def allocate(self, nbytes: int, gpu: int) -> np.ndarray:
        """`nbytes` of pinned memory; raises MemoryError with CUDA's reason on failure.

        The block is pinned for every GPU; selecting the model's GPU first only keeps
        the CUDA runtime from creating a context on GPU 0 for a model that runs elsewhere.
        """
        status = self._library.cudaSetDevice(gpu)
        if status != _CUDA_SUCCESS:
            raise MemoryError(f"cudaSetDevice({gpu}) failed: {self._error(status)}")
        pointer = ctypes.c_void_p()
        status = self._library.cudaHostAlloc(
            ctypes.byref(pointer), max(nbytes, 1), _HOST_ALLOC_PORTABLE
        )
        if status != _CUDA_SUCCESS or not pointer.value:
            raise MemoryError(f"cudaHostAlloc of {nbytes} bytes failed: {self._error(status)}")
        return np.asarray(PinnedBlock(self, pointer.value, nbytes))

    def free(self, pointer: int) -> None:
        """Give a block back; called by PinnedBlock when its last view is gone."""
        status = self._library.cudaFreeHost(ctypes.c_void_p(pointer))
        if status != _CUDA_SUCCESS:  # at interpreter exit the runtime may already be gone
            log.debug("cudaFreeHost failed: %s", self._error(status))

    def _error(self, status: int) -> str:
        text = self._library.cudaGetErrorString(status)
        return text.decode() if text else f"error {status}"


_shared_lock = threading.Lock()
_shared: tuple[PinnedAllocator | None, str] | None = None


def shared_allocator() -> PinnedAllocator | None:
    """The process's allocator, opened on first use (after a CUDA session exists).

    Where it cannot be opened, says why once for the whole process and returns None.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = PinnedAllocator.open()
            allocator, problem = _shared
            if allocator is not None:
                log.info("pinned staging memory from %s", allocator.path)
            else:
                log.warning("GPU batches are staged in ordinary memory: %s", problem)
        return _shared[0]
