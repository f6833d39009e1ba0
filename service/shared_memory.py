"""Client-registered system shared memory (Triton's system shared-memory extension).

A client creates a POSIX shared memory object, registers a window of it under a
name, and then names that window in inference requests instead of sending the
tensor bytes in the gRPC message. The server opens the object once, at
registration, and copies a tensor out of it (or an output into it) only while
decoding or answering a request: nothing keeps a view of client memory across
a batch, so a region can be unregistered at any time.

The client owns the memory and may shrink it behind the server's back; a mapped
page past the end of a shrunk object would kill the process with SIGBUS. So the
server never maps it: it reads and writes with pread/pwrite (SystemRegion).

Keys name objects in /dev/shm only, one path component, no symbolic links, and
never a key under RESERVED_KEY_PREFIX, which is kept for the server's own
buffers. Keys and paths never appear in error messages: a client that guesses
keys learns nothing from them.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import (
    AlreadyExistsError,
    InvalidInputError,
    NotFoundError,
    RequestTooLargeError,
    UnsupportedError,
)

log = logging.getLogger(__name__)

SHM_ROOT = Path("/dev/shm")
# The tensor parameters of the extension (Triton's names).
REGION_PARAMETER = "shared_memory_region"
SIZE_PARAMETER = "shared_memory_byte_size"
OFFSET_PARAMETER = "shared_memory_offset"
RESERVED_KEY_PREFIX = "batchwise"
MAX_REGIONS = 1024
MAX_NAME_LENGTH = 256
MAX_KEY_LENGTH = 255  # NAME_MAX: one path component
# Offsets and sizes arrive as uint64 or int64; nothing real comes near this.
MAX_EXTENT = 2**62

DISABLED_MESSAGE = (
    "system shared memory is off on this server; start it with --allow-shared-memory "
    "(BATCHWISE_ALLOW_SHARED_MEMORY=true) to register regions"
)


def _shown(name: str) -> str:
    """A region name fit for an error message: bounded, printable."""
    return "".join(ch if ch.isprintable() else "?" for ch in name[:80])


class SystemRegion:
    """One registered window [offset, offset + byte_size) of a shared memory object.

    Read and written with pread/pwrite on the object's descriptor, never mapped: a client
    that shrinks its object, or a /dev/shm that fills up, then gives a short read or
    ENOSPC (a clean error) where a mapping would kill the process with SIGBUS. The
    descriptor is closed only once no request is using it, so an unregister can never
    let a request read another file that reused the number.
    """

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int) -> None:
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size
        self._fd = fd
        self._users = 0
        self._closing = False
        self._lock = threading.Lock()

    def check_bounds(self, what: str, offset: int, size: int) -> None:
        """Refuse a window that does not lie inside the registered one."""
        if offset < 0 or size < 0:
            raise InvalidInputError(
                f"{what}: shared_memory_offset {offset} and shared_memory_byte_size {size} "
                "must not be negative"
            )
        if offset + size > self.byte_size:
            raise InvalidInputError(
                f"{what}: shared_memory_offset {offset} + shared_memory_byte_size {size} = "
                f"{offset + size} is past the end of shared memory region "
                f"'{_shown(self.name)}' ({self.byte_size} bytes)"
            )

    def read(self, what: str, offset: int, size: int) -> bytes:
        """A copy of `size` bytes at `offset` within the region."""
        self.check_bounds(what, offset, size)
        fd = self._enter(what)
        try:
            data = os.pread(fd, size, self.offset + offset) if size else b""
        except OSError as error:
            raise self._failed(what, error) from None
        finally:
            self._leave()
        if len(data) != size:
            raise self._shrunk(what)
        return data

    def write(self, what: str, offset: int, size: int, data: bytes) -> None:
        """Copy `data` to `offset` within the region; it must fit in `size` bytes."""
        if len(data) > size:
            raise InvalidInputError(
                f"{what} has {len(data)} bytes, more than its shared_memory_byte_size {size}"
            )
        self.check_bounds(what, offset, size)
        fd = self._enter(what)
        try:
            if os.fstat(fd).st_size < self.offset + offset + len(data):
                raise self._shrunk(what)
            written = os.pwrite(fd, data, self.offset + offset) if data else 0
        except OSError as error:
            raise self._failed(what, error) from None
        finally:
            self._leave()
        if written != len(data):
            raise self._shrunk(what)

    def _enter(self, what: str) -> int:
        with self._lock:
            if self._closing:
                raise NotFoundError(
                    f"{what}: shared memory region '{_shown(self.name)}' was unregistered "
                    "while the request used it"
                )
            self._users += 1
            return self._fd

    def _leave(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._closing and self._users == 0
        if close:
            os.close(self._fd)

    def _shrunk(self, what: str) -> InvalidInputError:
        return InvalidInputError(
            f"{what}: shared memory region '{_shown(self.name)}' has shrunk since it was "
            "registered; unregister it and register it again"
        )

    def _failed(self, what: str, error: OSError) -> InvalidInputError:
        return InvalidInputError(
            f"{what}: shared memory region '{_shown(self.name)}' cannot be used: "
            f"{error.strerror or 'I/O error'}"
        )

    def close(self) -> None:
        """Forget the region; its descriptor closes when the last request using it ends."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            close = self._users == 0
        if close:
            os.close(self._fd)


@dataclass(frozen=True, slots=True)
class Placement:
    """A tensor's window inside a registered region."""

    region: SystemRegion
    offset: int
    byte_size: int

    def read(self, what: str) -> bytes:
        return self.region.read(what, self.offset, self.byte_size)

    def write(self, what: str, data: bytes) -> None:
        self.region.write(what, self.offset, self.byte_size, data)


def _whole_number(what: str, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(
            f"{what}: parameter '{key}' is {value!r}; expected a non-negative integer "
            "(int64_param or uint64_param)"
        )
    return value


def _checked_key(key: str) -> str:
    """The object's file name under /dev/shm, as shm_open would resolve `key`."""
    name = key[1:] if key.startswith("/") else key
    if not name:
        raise InvalidInputError("key is empty; give the key the region was created with")
    if len(name) > MAX_KEY_LENGTH or "/" in name or "\0" in name or name in (".", ".."):
        raise InvalidInputError(
            "key is not a valid shared memory key: it must be one name of at most "
            f"{MAX_KEY_LENGTH} characters with no '/' after an optional leading one"
        )
    if name.startswith(RESERVED_KEY_PREFIX):
        raise InvalidInputError(
            f"key is reserved: keys starting with '{RESERVED_KEY_PREFIX}' belong to the "
            "server's own buffers"
        )
    return name


def _open_object(name: str, shown: str) -> int:
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(SHM_ROOT / name, flags)
    except OSError as error:
        reason = {
            errno.ENOENT: "no shared memory object has that key",
            errno.EACCES: "the server may not read and write the object with that key",
            errno.EPERM: "the server may not read and write the object with that key",
            errno.ELOOP: "the key names a link, not a shared memory object",
        }.get(error.errno or 0)
        if reason is None and error.errno in (errno.EMFILE, errno.ENFILE):
            raise RequestTooLargeError(
                f"cannot register region '{shown}': the server has no file descriptor left; "
                "unregister some regions"
            ) from None
        reason = reason or "the shared memory object with that key cannot be opened"
        raise InvalidInputError(f"cannot register region '{shown}': {reason}") from None
    return fd


class SharedMemoryRegions:
    """The registered regions, by name; registration happens on the event loop,
    lookups also from decoding threads."""

    def __init__(self, enabled: bool, max_tensor_bytes: int) -> None:
        self.enabled = enabled
        # Bounds what one BYTES tensor may make the server copy out of a region.
        self.max_tensor_bytes = max_tensor_bytes
        self._regions: dict[str, SystemRegion] = {}
        self._lock = threading.Lock()

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise UnsupportedError(DISABLED_MESSAGE)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_enabled()
        if not name:
            raise InvalidInputError("name is empty; give the region a name to use in requests")
        if len(name) > MAX_NAME_LENGTH:
            raise InvalidInputError(f"name is longer than {MAX_NAME_LENGTH} characters")
        shown = _shown(name)
        object_name = _checked_key(key)
        if byte_size <= 0 or byte_size > MAX_EXTENT or offset < 0 or offset > MAX_EXTENT:
            raise InvalidInputError(
                f"cannot register region '{shown}': byte_size must be at least 1 and offset "
                f"not negative (got offset {offset}, byte_size {byte_size})"
            )
        with self._lock:
            if name in self._regions:
                raise AlreadyExistsError(
                    f"a shared memory region named '{shown}' is already registered; "
                    "unregister it first or pick another name"
                )
            if len(self._regions) >= MAX_REGIONS:
                raise RequestTooLargeError(
                    f"this server holds at most {MAX_REGIONS} shared memory regions; "
                    "unregister some first"
                )
        fd = _open_object(object_name, shown)
        try:
            self._checked_object(fd, offset, byte_size, shown)
        except BaseException:
            os.close(fd)
            raise
        region = SystemRegion(name, key, offset, byte_size, fd)
        with self._lock:
            if name in self._regions:  # registered by a concurrent call meanwhile
                region.close()
                raise AlreadyExistsError(
                    f"a shared memory region named '{shown}' is already registered"
                )
            self._regions[name] = region
        log.info("registered system shared memory region '%s' (%d bytes)", shown, byte_size)

    @staticmethod
    def _checked_object(fd: int, offset: int, byte_size: int, shown: str) -> None:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(
                f"cannot register region '{shown}': the key does not name a shared memory object"
            )
        end = offset + byte_size
        if end > info.st_size:
            raise InvalidInputError(
                f"cannot register region '{shown}': offset {offset} + byte_size {byte_size} = "
                f"{end} is past the end of the shared memory object ({info.st_size} bytes)"
            )

    def unregister(self, name: str) -> None:
        """Forget one region, or all of them when `name` is empty; an unknown name is
        not an error (as in Triton), so a client's clean-up can always run."""
        self._check_enabled()
        with self._lock:
            if name:
                removed = [self._regions.pop(name)] if name in self._regions else []
            else:
                removed = list(self._regions.values())
                self._regions.clear()
        for region in removed:
            region.close()
            log.info("unregistered system shared memory region '%s'", _shown(region.name))

    def status(self, name: str) -> list[SystemRegion]:
        """One region, or all of them when `name` is empty."""
        self._check_enabled()
        with self._lock:
            if not name:
                return list(self._regions.values())
            region = self._regions.get(name)
        if region is None:
            raise NotFoundError(
                f"no system shared memory region named '{_shown(name)}' is registered"
            )
        return [region]

    def status_cuda(self, name: str) -> None:
        """CUDA regions: this server registers none, so only the empty listing exists."""
        self._check_enabled()
        if name:
            raise NotFoundError(
                f"no CUDA shared memory region named '{_shown(name)}' is registered; this "
                "server supports system shared memory only"
            )

    def unregister_cuda(self, name: str) -> None:
        """Nothing to forget; succeeds as unregistering an unknown system region does."""
        self._check_enabled()

    def lookup(self, what: str, name: str) -> SystemRegion:
        """The region a tensor of a request names."""
        self._check_enabled()
        with self._lock:
            region = self._regions.get(name)
        if region is None:
            raise InvalidInputError(
                f"{what} names shared memory region '{_shown(name)}', which is not registered "
                "(SystemSharedMemoryRegister)"
            )
        return region

    def placement(self, what: str, parameters: Mapping[str, object]) -> Placement | None:
        """Where a tensor's bytes live, from its parameters; None when they are inline."""
        name = parameters.get(REGION_PARAMETER)
        if name is None:
            for key in (SIZE_PARAMETER, OFFSET_PARAMETER):
                if key in parameters:
                    raise InvalidInputError(
                        f"{what} has parameter '{key}' but no '{REGION_PARAMETER}'; give both "
                        f"'{REGION_PARAMETER}' and '{SIZE_PARAMETER}' or neither"
                    )
            return None
        if not self.enabled:
            raise UnsupportedError(f"{what} names a shared memory region; {DISABLED_MESSAGE}")
        if not isinstance(name, str):
            raise InvalidInputError(
                f"{what}: parameter '{REGION_PARAMETER}' must be a string (string_param)"
            )
        if SIZE_PARAMETER not in parameters:
            raise InvalidInputError(
                f"{what} has parameter '{REGION_PARAMETER}' but no '{SIZE_PARAMETER}'; give both"
            )
        size = _whole_number(what, SIZE_PARAMETER, parameters[SIZE_PARAMETER])
        offset = _whole_number(what, OFFSET_PARAMETER, parameters.get(OFFSET_PARAMETER, 0))
        region = self.lookup(what, name)
        region.check_bounds(what, offset, size)
        return Placement(region, offset, size)

    def close(self) -> None:
        """Unmap everything at shutdown; the objects themselves belong to the clients."""
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
        for region in regions:
            region.close()
