"""Executing a batch of validated requests as one onnxruntime run.

`ModelRunner.execute` runs in a worker thread. It merges the requests' inputs
along the batch dimension (padding the inputs the config declares paddable to
the longest in the batch), turns them into model-shaped feeds (config
`reshape`), runs the session once, then splits every output back per request,
cuts padded dimensions back to each request's own size, checks the shapes
against the configuration and encodes the result. Merged inputs are written into
the instance thread's staging buffers (see `staging`), page-locked for GPU
sessions unless that is turned off.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .datatypes import encode_raw, format_shape
from .errors import InvalidInputError, ModelExecutionError
from .inference import InferenceRequest, InferenceResult, OutputTensor
from .model_config import ModelSignature, TensorSpec
from .pinned import shared_allocator
from .runtime import OnnxSession
from .staging import StagingArea, pageable
from .statistics import RequestTimings


@dataclass
class BatchOutcome:
    results: list[InferenceResult]
    elements: int = 0  # input elements fed to the model
    padded_elements: int = 0  # of which padding


class ModelRunner:
    def __init__(
        self,
        sessions: Sequence[OnnxSession],
        signature: ModelSignature,
        label: str,
        staging_limit_bytes: int = 0,
        pinned_staging: bool = False,
        narrow: OnnxSession | None = None,
    ) -> None:
        """`narrow`: a one-thread session (CPU) for the runs `execute` is told are not
        alone; the others use the multi-threaded session of their instance."""
        # One session per device; each instance thread keeps the one it was dealt first,
        # so instances spread evenly over the devices (Triton's count per GPU).
        self._sessions = list(sessions)
        self._narrow = narrow
        # Runs made on the one-thread session (a count for tests and investigations).
        self.narrow_runs = 0
        self._dealt = itertools.count()
        self._local = threading.local()
        self._signature = signature
        self._label = label
        self._staging_limit = staging_limit_bytes
        self._pinned_staging = pinned_staging
        # For each padded symbol (e.g. "sequence"), the outputs' axes that follow it.
        self._padded_symbols: set[str | None] = {
            spec.symbols[axis]
            for spec in signature.inputs
            if spec.name in signature.pad_values
            for axis, dim in enumerate(spec.dims)
            if dim == -1 and axis < len(spec.symbols) and spec.symbols[axis] is not None
        }

    @property
    def on_gpu(self) -> bool:
        return any(session.gpu is not None for session in self._sessions)

    @property
    def has_narrow(self) -> bool:
        return self._narrow is not None

    def execute(
        self, batch: Sequence[InferenceRequest], timings: RequestTimings, narrow: bool = False
    ) -> BatchOutcome:
        """Run the batch once; `timings` records where the time went, even on failure.

        `narrow`: other runs are in progress, so run on one thread (if there is a
        one-thread session) rather than compete for every core.
        """
        outcome = BatchOutcome([])
        started = time.perf_counter_ns()
        rows = sum(request.batch_size for request in batch)
        feeds = {
            name: self._to_model_shape(name, self._merge(name, batch, outcome), rows)
            for name in batch[0].inputs
        }
        output_names = list(dict.fromkeys(name for r in batch for name in r.outputs))
        ready = time.perf_counter_ns()
        timings.compute_input_ns = ready - started
        timings.executed = True
        try:
            if narrow and self._narrow is not None:
                session = self._narrow
                self.narrow_runs += 1
            else:
                session = self.thread_session()
            produced = dict(zip(output_names, session.run(feeds, output_names), strict=True))
        finally:
            timings.compute_infer_ns = time.perf_counter_ns() - ready
        ran = time.perf_counter_ns()
        offset = 0
        for request in batch:
            sizes = self._symbol_sizes(request)
            outputs = tuple(
                self._encode(name, produced[name], offset, request.batch_size, sizes)
                for name in request.outputs
            )
            outcome.results.append(InferenceResult(outputs))
            offset += request.batch_size
        timings.compute_output_ns = time.perf_counter_ns() - ran
        return outcome

    def thread_session(self) -> OnnxSession:
        """The session the calling instance thread runs on (dealt on its first call)."""
        session: OnnxSession | None = getattr(self._local, "session", None)
        if session is None:
            session = self._sessions[next(self._dealt) % len(self._sessions)]
            self._local.session = session
        return session

    def thread_staging(self) -> StagingArea:
        """The calling instance thread's staging buffers (made on its first call).

        Page-locked for a GPU session when allowed and the CUDA runtime can be
        reached (else ordinary memory; `pinned.shared_allocator` says why, once).
        """
        staging: StagingArea | None = getattr(self._local, "staging", None)
        if staging is None:
            session = self.thread_session()
            allocator = (
                shared_allocator() if self._pinned_staging and session.gpu is not None else None
            )
            if allocator is not None and session.gpu is not None:
                gpu = session.gpu

                def allocate(nbytes: int) -> np.ndarray:
                    return allocator.allocate(nbytes, gpu)

                staging = StagingArea(allocate, self._staging_limit, self._label, pinned=True)
            else:
                staging = StagingArea(pageable, self._staging_limit, self._label)
            self._local.staging = staging
        return staging

    def reserve_staging(self, longest: int | None = None) -> int:
        """Size this thread's buffers for a full batch now; returns the bytes held.

        Called on every instance thread at warm-up, so that page-locked memory is
        allocated at load rather than grown (cudaFreeHost waits for the GPU) under
        the first batches. Variable dims are taken at `longest` (warm-up's longest
        sequence); without it, inputs that have them grow when first seen.
        """
        staging = self.thread_staging()
        if not self._signature.batching:
            return staging.held_bytes
        for spec in self._signature.inputs:
            if spec.datatype.is_bytes or (longest is None and any(d < 0 for d in spec.dims)):
                continue
            dims = tuple(longest if d < 0 and longest else d for d in spec.dims)
            rows = self._signature.max_batch_size
            staging.array(spec.name, np.dtype(spec.datatype.numpy_dtype), (rows, *dims))
        return staging.held_bytes

    # ------------------------------------------------------------- inputs ---

    def _merge(
        self, name: str, batch: Sequence[InferenceRequest], outcome: BatchOutcome
    ) -> np.ndarray:
        arrays = [request.inputs[name] for request in batch]
        given = sum(a.size for a in arrays)
        outcome.elements += given
        if len(arrays) == 1:
            return arrays[0]
        dtype = arrays[0].dtype
        if dtype.hasobject:  # BYTES (never paddable): Python objects, nothing to stage
            return np.concatenate(arrays, axis=0)
        rows = sum(int(a.shape[0]) for a in arrays)
        # Requests batch together only with equal shapes, except along padded dims.
        extent = tuple(int(d) for d in np.max([a.shape[1:] for a in arrays], axis=0))
        shape = (rows, *extent)
        merged = self.thread_staging().array(name, dtype, shape)
        if merged is None:
            merged = np.empty(shape, dtype=dtype)
        pad = self._signature.pad_values.get(name)
        if pad is not None and merged.size > given:
            merged.fill(pad)
            outcome.padded_elements += merged.size - given
            outcome.elements += merged.size - given
            offset = 0
            for array in arrays:
                region = (slice(offset, offset + array.shape[0]), *map(slice, array.shape[1:]))
                merged[region] = array
                offset += array.shape[0]
            return merged
        # Byte copies through memoryviews hold the GIL: numpy releases it for every
        # array it copies and must win it back from the busy event loop each time,
        # which took 93 ms instead of 1 ms for 18 ResNet images (see `staging`).
        if any(a.shape[1:] != extent or a.dtype != dtype for a in arrays):  # as _batch_key grouped
            raise ModelExecutionError(f"{self._label}: requests of different shapes were batched")
        target = merged.reshape(-1).view(np.uint8).data
        offset = 0
        for array in arrays:
            source = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
            target[offset : offset + source.nbytes] = source
            offset += source.nbytes
        return merged

    def _to_model_shape(self, name: str, array: np.ndarray, rows: int) -> np.ndarray:
        spec = self._signature.input(name)
        assert spec is not None, "inputs were validated against the signature"
        if spec.model_dims is None:
            return array
        target = ([rows] if self._signature.batching else []) + list(spec.model_dims)
        try:
            return array.reshape(target)
        except ValueError:
            raise InvalidInputError(
                f"input '{spec.name}' of shape {format_shape(array.shape)} cannot be reshaped to "
                f"the model's shape {format_shape(target)}"
            ) from None

    def _symbol_sizes(self, request: InferenceRequest) -> dict[str, int]:
        """This request's own sizes of the dims that padding may have grown."""
        sizes: dict[str, int] = {}
        if not self._padded_symbols:
            return sizes
        skip = 1 if self._signature.batching else 0
        for spec in self._signature.inputs:
            array = request.inputs.get(spec.name)
            if array is None:
                continue
            for axis, symbol in enumerate(spec.symbols):
                if symbol is not None and symbol in self._padded_symbols:
                    sizes[symbol] = int(array.shape[axis + skip])
        return sizes

    # ------------------------------------------------------------ outputs ---

    def _encode(
        self, name: str, array: np.ndarray, offset: int, rows: int, sizes: dict[str, int]
    ) -> OutputTensor:
        spec = self._signature.output(name)
        assert spec is not None, "outputs were validated against the signature"
        batching = self._signature.batching
        if batching:
            array = array[offset : offset + rows]
        expected = ([rows] if batching else []) + list(spec.dims)
        if spec.model_dims is not None:
            try:
                array = array.reshape(expected)
            except ValueError:
                raise self._mismatch(spec, array, expected) from None
        if sizes:
            array = self._cut(spec, array, sizes, 1 if batching else 0)
        if array.ndim != len(expected) or any(
            want != -1 and got != want for got, want in zip(array.shape, expected, strict=True)
        ):
            raise self._mismatch(spec, array, expected)
        return OutputTensor(
            spec.name, spec.datatype.name, tuple(array.shape), encode_raw(spec.datatype, array)
        )

    @staticmethod
    def _cut(spec: TensorSpec, array: np.ndarray, sizes: dict[str, int], skip: int) -> np.ndarray:
        index: list[slice] = [slice(None)] * array.ndim
        for axis, symbol in enumerate(spec.symbols):
            if symbol in sizes and axis + skip < array.ndim:
                index[axis + skip] = slice(0, sizes[symbol])
        return array[tuple(index)]

    def _mismatch(
        self, spec: TensorSpec, array: np.ndarray, expected: list[int]
    ) -> ModelExecutionError:
        return ModelExecutionError(
            f"{self._label} produced output '{spec.name}' with shape {format_shape(array.shape)}, "
            f"but its configuration declares {format_shape(expected)}"
        )
