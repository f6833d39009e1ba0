"""Staging buffers and page-locked memory on their own.

The server's use of them (batches merged into reused buffers, each answer its
own, padding reset) is tested through the wire in tests/test_batching.py; the
page-locked path on a real GPU in tests/test_gpu.py. Here: how buffers grow and
are shared, and that a CUDA runtime that refuses page-locked memory (this
machine has the library, from perf_analyzer's dependencies, but no GPU) leaves
ordinary memory with the reason logged.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from service.pinned import PinnedAllocator, _loaded_cudart
from service.staging import StagingArea, pageable
from tests import onnx_models as models
from tests.conftest import serve

FP32 = np.dtype(np.float32)


def _recording(sizes: list[int]):  # type: ignore[no-untyped-def]
    def allocate(nbytes: int) -> np.ndarray:
        sizes.append(nbytes)
        return pageable(nbytes)

    return allocate


def test_a_buffer_is_reused_and_grows_by_doubling_up_to_the_limit() -> None:
    sizes: list[int] = []
    area = StagingArea(_recording(sizes), limit_bytes=1000, label="m")
    first = area.array("x", FP32, (10, 5))  # 200 bytes
    smaller = area.array("x", FP32, (4, 5))
    assert first is not None and smaller is not None
    assert np.shares_memory(first, smaller) and smaller.shape == (4, 5)
    assert area.array("x", FP32, (12, 5)) is not None  # 240: doubled to 400
    assert area.array("x", FP32, (60, 4)) is not None  # 960: more than double
    assert area.array("x", FP32, (63, 4)) is None  # 1008: over the limit, not kept
    assert sizes == [200, 400, 960]
    assert area.held_bytes == 960


def test_each_input_has_its_own_buffer_and_bytes_tensors_none() -> None:
    area = StagingArea(pageable, limit_bytes=1 << 20, label="m")
    tokens = area.array("tokens", np.dtype(np.int64), (4, 16))
    mask = area.array("mask", np.dtype(np.int64), (4, 16))
    assert tokens is not None and mask is not None
    assert not np.shares_memory(tokens, mask)
    assert area.array("text", np.dtype(object), (4, 1)) is None
    assert area.held_bytes == 2 * 4 * 16 * 8
    assert not area.pinned


def test_a_zero_limit_keeps_nothing() -> None:
    area = StagingArea(pageable, limit_bytes=0, label="m")
    assert area.array("x", FP32, (1, 1)) is None
    assert area.held_bytes == 0


def _cuda_runtime() -> Path | None:
    try:
        import nvidia.cuda_runtime
    except ImportError:
        return None
    found = sorted(Path(next(iter(nvidia.cuda_runtime.__path__))).glob("lib/libcudart.so.*"))
    return found[0] if found else None


def _gpus_seen_by(library: Path) -> int:
    count = ctypes.c_int(0)
    status = ctypes.CDLL(str(library)).cudaGetDeviceCount(ctypes.byref(count))
    return count.value if status == 0 else 0


CUDART = _cuda_runtime()
needs_cudart = pytest.mark.skipif(
    CUDART is None, reason="the CUDA runtime library (nvidia-cuda-runtime) is not installed"
)


@needs_cudart
def test_the_cuda_runtime_in_the_process_is_found_in_its_memory_map() -> None:
    assert CUDART is not None
    ctypes.CDLL(str(CUDART))
    assert str(CUDART.resolve()) in _loaded_cudart()
    allocator, problem = PinnedAllocator.open()
    assert allocator is not None, problem
    assert allocator.path in _loaded_cudart()  # the first one mapped, whoever loaded it


def test_the_memory_map_is_read_even_with_file_names_that_are_not_utf8(tmp_path: Path) -> None:
    name = os.fsencode(tmp_path) + b"/model-\xe9.onnx"
    with open(name, "wb") as file:
        file.write(b"\0" * mmap.PAGESIZE)
    with open(name, "rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ):
        assert isinstance(_loaded_cudart(), list)


@needs_cudart
@pytest.mark.skipif(
    CUDART is not None and _gpus_seen_by(CUDART) > 0, reason="a GPU is visible: CUDA would pin"
)
def test_without_a_gpu_page_locked_memory_is_refused_with_cudas_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert CUDART is not None
    allocator = PinnedAllocator(ctypes.CDLL(str(CUDART)), str(CUDART))
    with pytest.raises(MemoryError) as refused:
        allocator.allocate(4096, 0)
    reason = str(refused.value)
    assert reason.startswith(("cudaSetDevice(0) failed: ", "cudaHostAlloc of 4096 bytes failed: "))
    assert len(reason.split(": ", 1)[1]) > 5  # CUDA's own words, not a bare number
    # In a staging area: the batch still gets a buffer, in ordinary memory, and the log says why.
    area = StagingArea(
        lambda n: allocator.allocate(n, 0), 1 << 20, "model 'm' version 1", pinned=True
    )
    assert area.pinned
    with caplog.at_level(logging.WARNING, logger="service.staging"):
        merged = area.array("x", FP32, (8, 4))
    assert merged is not None and merged.shape == (8, 4)
    assert not area.pinned and area.failed == reason
    assert f"model 'm' version 1: {reason}; staging in ordinary memory instead" in caplog.text
    assert area.array("x", FP32, (8, 4)) is not None  # and it stays there, without new warnings
    assert caplog.text.count("staging in ordinary memory") == 1


@pytest.mark.parametrize("warmup", ["all", "off"])
def test_warm_up_sizes_the_staging_buffers_for_a_full_batch(tmp_path: Path, warmup: str) -> None:
    """So that page-locked memory is allocated at load, not under the first batches."""
    models.save(
        models.add_sub(),
        tmp_path,
        "add_sub",
        config='name: "add_sub"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        "dynamic_batching { }\ninstance_group [ { count: 2 kind: KIND_CPU } ]\n",
    )
    with serve(tmp_path, warmup=warmup) as server:
        version = server.server.registry.resolve("add_sub", "")
        runner = version.runner
        held = version.scheduler.on_every_instance(lambda: runner.thread_staging().held_bytes)
    # Two FP32 inputs of 16 values, 8 rows each, on each of the two instance threads.
    assert held == ([2 * 8 * 16 * 4] * 2 if warmup == "all" else [0, 0])


def test_warm_up_sizes_padded_inputs_at_the_longest_sequence(tmp_path: Path) -> None:
    models.save(
        models.sleepy_tokens(),
        tmp_path,
        "tokens",
        config='name: "tokens"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
        "dynamic_batching { }\n"
        'parameters { key: "padding" value: { string_value: "tokens:0, mask:0" } }\n'
        'parameters { key: "max_sequence_length" value: { string_value: "20" } }\n',
    )
    with serve(tmp_path, warmup="all") as server:
        version = server.server.registry.resolve("tokens", "")
        runner = version.runner
        held = version.scheduler.on_every_instance(lambda: runner.thread_staging().held_bytes)
    # tokens and mask: 4 rows x 20 FP32; steps: 4 rows x 1 INT64.
    assert held == [2 * 4 * 20 * 4 + 4 * 8]
