"""GPU readings through NVML, when there is a GPU and NVML to read it.

`nvidia-ml-py` (the `gpu` extra) provides the `pynvml` module. Without it, or
without a driver or a device, `GpuMonitor.read()` returns nothing and nothing
is logged above DEBUG: a CPU-only server exports no GPU metrics and no errors.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    utilization: float  # 0..1, over the driver's last sample period
    memory_used_bytes: int
    memory_total_bytes: int
    power_watts: float | None


class GpuMonitor:
    def __init__(self) -> None:
        self._nvml: Any = None
        self._lock = threading.Lock()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            log.info("NVML found %d GPU(s)", pynvml.nvmlDeviceGetCount())
        except Exception as error:  # no module, no driver, no device: all mean "no GPU"
            log.debug("no GPU metrics: %s", error)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def read(self) -> list[GpuReading]:
        if self._nvml is None:
            return []
        nvml = self._nvml
        readings = []
        with self._lock:
            try:
                for index in range(nvml.nvmlDeviceGetCount()):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                    try:
                        power: float | None = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
                    except Exception:  # not every board reports power
                        power = None
                    readings.append(
                        GpuReading(
                            index=index,
                            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                            name=_text(nvml.nvmlDeviceGetName(handle)),
                            utilization=nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
                            memory_used_bytes=int(memory.used),
                            memory_total_bytes=int(memory.total),
                            power_watts=power,
                        )
                    )
            except Exception as error:  # a device that vanished must not break a scrape
                log.warning("reading GPU metrics failed: %s", error)
        return readings


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_gpu_count(environ: dict[str, str] | None = None) -> int | None:
    """How many GPUs CUDA will show this process; None when nothing can tell.

    CUDA_VISIBLE_DEVICES wins (NVML ignores it); otherwise NVML's device count.
    """
    environ = dict(os.environ) if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [entry.strip() for entry in visible.split(",")]
        count = 0
        for entry in entries:
            # CUDA stops at the first invalid entry ("-1" is the usual way to hide all).
            if not entry or entry.startswith("-"):
                break
            count += 1
        return count
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no module, no driver: unknown, onnxruntime will tell at load
        return None


def tensorrt_libraries_present() -> bool:
    """Whether TensorRT's runtime library loads; onnxruntime lists its provider regardless."""
    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False
