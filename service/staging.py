"""Reusable host buffers that a batch's inputs are merged into.

Merging N requests into one array per input allocates a new array for every
batch. Above glibc's mmap threshold (at most 32 MiB: 53 ResNet-sized images)
each such array is fresh memory from the kernel and every page of it faults
on first write, which doubled the merge time of a 64-image batch measured on
the CPU (7.6 vs 3.6 ms). On a GPU the buffer should also be page-locked so the
copy to the device is a DMA, and page-locked memory is far too slow to
allocate per batch. So each instance thread keeps one buffer per input, grown
(doubling, up to a limit) and reused; batches above the limit get a fresh array.

Reuse is safe because one instance thread runs one batch at a time and the
outputs are encoded into bytes before its run returns: nothing read from a
buffer outlives the run that filled it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

Allocate = Callable[[int], np.ndarray]  # nbytes -> uint8 array of at least that size


def pageable(nbytes: int) -> np.ndarray:
    """Ordinary memory: what every CPU session, and a GPU one without pinning, stages in."""
    return np.empty(nbytes, dtype=np.uint8)


class StagingArea:
    """One instance thread's buffers, one per input name.

    `pinned` says that `allocate` gives page-locked memory, whose failure is not
    fatal: the area then carries on in ordinary memory.
    """

    def __init__(
        self, allocate: Allocate, limit_bytes: int, label: str, pinned: bool = False
    ) -> None:
        self._allocate = allocate
        self._limit = limit_bytes
        self._label = label
        self._buffers: dict[str, np.ndarray] = {}
        self.pinned = pinned
        self.failed: str | None = None  # why page-locked memory was given up, if it was

    @property
    def held_bytes(self) -> int:
        return sum(buffer.nbytes for buffer in self._buffers.values())

    def array(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray | None:
        """An uninitialised array of this shape in `name`'s buffer; None above the limit."""
        if dtype.hasobject:  # BYTES tensors hold Python objects: nothing to stage
            return None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > self._limit:
            return None
        buffer = self._buffers.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            grown = nbytes if buffer is None else max(nbytes, min(2 * buffer.nbytes, self._limit))
            self._buffers.pop(name, None)  # let the old one go before asking for the new one
            buffer = self._grow(grown)
            self._buffers[name] = buffer
        return buffer[:nbytes].view(dtype).reshape(shape)

    def _grow(self, nbytes: int) -> np.ndarray:
        try:
            return self._allocate(nbytes)
        except MemoryError as error:
            if not self.pinned:
                raise
            # Pinned memory is a limited resource; ordinary memory still works.
            self.failed = str(error)
            log.warning("%s: %s; staging in ordinary memory instead", self._label, error)
            self._allocate = pageable
            self.pinned = False
            return pageable(nbytes)
