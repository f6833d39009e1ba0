"""Fatal runtime errors: the process stops instead of answering errors forever.

Some failures leave a model runtime that will never work again in this process:
a CUDA error that poisons the device context (an illegal memory access, say), a
scheduler worker thread that died. Serving on would turn every later request
into an error while health checks, which do not run the model, stay green.
Reporting one here makes the server stop taking work, drain briefly and exit
with EXIT_CODE, so that the orchestrator restarts it on a fresh context.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_CODE = 3
# Messages of onnxruntime (CUDA/TensorRT providers) after which the device context is lost.
FATAL_MARKERS = (
    "CUDA failure",
    "CUDNN failure",
    "CUBLAS failure",
    "cudaErrorIllegalAddress",
    "illegal memory access",
    "unspecified launch failure",
    "device-side assert",
    "TensorRT EP execution context enqueue fail",
)

_listeners: list[Callable[[str], None]] = []
_lock = threading.Lock()


# Out of memory is one request's problem (a batch too large), not the process's.
NOT_FATAL_MARKERS = ("out of memory", "ALLOC_FAILED", "Failed to allocate")


def is_fatal_message(text: str) -> bool:
    if any(marker in text for marker in NOT_FATAL_MARKERS):
        return False
    return any(marker in text for marker in FATAL_MARKERS)


def subscribe(listener: Callable[[str], None]) -> Callable[[], None]:
    """Call `listener(reason)` (from any thread) on a fatal error; returns an unsubscriber."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def report(reason: str) -> None:
    """Record a fatal error; safe from worker threads."""
    log.critical("fatal runtime error, the server will exit: %s", reason)
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(reason)
