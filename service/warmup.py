"""Warm-up at load: run the shapes the batcher will form before the first request.

On a GPU the first run at a new input shape pays for cuDNN algorithm
selection, kernel loading and memory-arena growth; without warm-up a client's
first request at batch 7 is the one that pays. The dynamic batcher forms any
batch size up to max_batch_size, and variable-length inputs are padded to the
longest in the batch, so on a GPU warm-up covers every batch size up to
max_batch_size (on the CPU: every size up to 32, the powers of two, the
preferred sizes and max_batch_size), each at sequence lengths in powers of two
up to the model's max_sequence_length. Largest first, so the
memory arena grows once to its peak instead of step by step.

It runs on the instance threads themselves (see
Scheduler.on_every_instance): the CUDA provider's per-thread state would
otherwise be created by the first real batch on each thread.

Warm-up feeds the session directly (model-shaped tensors: zeros for integers,
which are valid token ids and indices; seeded random values for floats).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from .errors import ServingError
from .model_config import GraphSignature
from .protocol import model_config_pb2 as mc
from .runtime import OnnxSession

log = logging.getLogger(__name__)

_ALL_SIZES_UP_TO = 32
_DEFAULT_LONGEST = 128
_SHORTEST_BUCKET = 8
# Most shapes one thread warms up: beyond it (a large max_batch_size times many
# length buckets) sizes above _ALL_SIZES_UP_TO are sampled even on a GPU.
_MOST_SHAPES = 1024


@dataclass(frozen=True)
class WarmupReport:
    runs: int
    seconds: float
    shapes: tuple[tuple[int | None, int | None], ...]  # (rows, length) pairs that ran
    failure: str | None = None  # why warm-up stopped early


def wanted(mode: str, config: mc.ModelConfig, on_gpu: bool) -> bool:
    """The server's --warmup mode, unless the model's `warmup` parameter says otherwise."""
    if "warmup" in config.parameters:
        return config.parameters["warmup"].string_value.strip().lower() in ("1", "true", "on")
    return mode == "all" or (mode == "gpu" and on_gpu)


def batch_sizes(config: mc.ModelConfig, every_size: bool = False) -> list[int | None]:
    """The sizes the batcher may form that are worth a run, largest first.

    `every_size` (sessions on a GPU): all of 1..max_batch_size. On an H100 the
    first ResNet-18 run of a batch size a thread had not run before took about
    5x its repeat time, and under load the batcher forms any size; on the CPU
    there is little per-shape state, so sizes above 32 are sampled.
    """
    largest = config.max_batch_size
    if largest <= 0:
        return [None]
    sizes = set(range(1, (largest if every_size else min(largest, _ALL_SIZES_UP_TO)) + 1))
    power = 1
    while power <= largest:
        sizes.add(power)
        power *= 2
    sizes.update(s for s in config.dynamic_batching.preferred_batch_size if 0 < s <= largest)
    sizes.add(largest)
    ordered: list[int | None] = [*sorted(sizes, reverse=True)]
    return ordered


def sequence_lengths(config: mc.ModelConfig, graph: GraphSignature) -> list[int | None]:
    """Length buckets for dynamic non-batch dims, largest first; [None] when there are none."""
    skip = 1 if config.max_batch_size > 0 else 0
    if not any(d is None for tensor in graph.inputs for d in tensor.shape[skip:]):
        return [None]
    longest = _DEFAULT_LONGEST
    if "max_sequence_length" in config.parameters:
        text = config.parameters["max_sequence_length"].string_value.strip()
        if text.isdigit() and int(text) > 0:
            longest = int(text)
    lengths = {longest}
    bucket = _SHORTEST_BUCKET
    while bucket < longest:
        lengths.add(bucket)
        bucket *= 2
    ordered: list[int | None] = [*sorted(lengths, reverse=True)]
    return ordered


def feeds_for(
    graph: GraphSignature, batching: bool, rows: int | None, length: int | None
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for tensor in graph.inputs:
        shape: list[int] = []
        for axis, dim in enumerate(tensor.shape):
            if axis == 0 and batching:
                shape.append(rows or 1)
            elif dim is None:
                shape.append(length or 1)
            else:
                shape.append(dim)
        datatype = tensor.datatype
        if datatype is None:
            raise ValueError(f"input '{tensor.name}' has type {tensor.ort_type}")
        dtype = datatype.numpy_dtype
        if dtype.kind == "f":
            feeds[tensor.name] = rng.random(shape).astype(dtype)
        elif dtype.kind == "O":
            feeds[tensor.name] = np.full(shape, "", dtype=object)
        else:
            feeds[tensor.name] = np.zeros(shape, dtype=dtype)
    return feeds


def warm_up(session: OnnxSession, config: mc.ModelConfig, label: str) -> WarmupReport:
    """Run every planned shape once; a failing shape stops warm-up, never the load."""
    graph = session.graph
    batching = config.max_batch_size > 0
    outputs = [tensor.name for tensor in graph.outputs]
    started = time.perf_counter()
    done: list[tuple[int | None, int | None]] = []
    lengths = sequence_lengths(config, graph)
    sizes = batch_sizes(config, every_size=session.on_gpu)
    if len(sizes) * len(lengths) > _MOST_SHAPES:
        sizes = batch_sizes(config)
    for rows in sizes:
        for length in lengths:
            try:
                session.run(feeds_for(graph, batching, rows, length), outputs)
            except (ServingError, ValueError) as error:
                failure = f"batch {rows}, length {length}: {error}"
                log.warning("%s: warm-up stopped at %s", label, failure)
                return WarmupReport(len(done), time.perf_counter() - started, tuple(done), failure)
            done.append((rows, length))
    seconds = time.perf_counter() - started
    log.debug(
        "%s: warm-up on thread [%s]: %d shapes in %.2fs",
        label,
        threading.current_thread().name,
        len(done),
        seconds,
    )
    return WarmupReport(len(done), seconds, tuple(done))
