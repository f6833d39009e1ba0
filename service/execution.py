"""Executing validated requests on a model version's session.

`ModelRunner.execute` is synchronous and runs in a worker thread: it turns
client-shaped inputs into model-shaped feeds (config `reshape`), runs the
session, checks what the model produced against the configured outputs and
encodes them. `InstancePool` bounds how many executions of one model version
are in flight (instance_group count) and keeps them off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .datatypes import encode_raw, format_shape
from .errors import InvalidInputError, ModelExecutionError
from .inference import InferenceRequest, InferenceResult, OutputTensor
from .model_config import ModelSignature, TensorSpec
from .runtime import OnnxSession
from .statistics import RequestTimings


class ModelRunner:
    def __init__(self, session: OnnxSession, signature: ModelSignature, label: str) -> None:
        self._session = session
        self._signature = signature
        self._label = label

    def execute(self, request: InferenceRequest, timings: RequestTimings) -> InferenceResult:
        started = time.perf_counter_ns()
        feeds = {
            name: self._to_model_shape(self._signature.input(name), array, request.batch_size)
            for name, array in request.inputs.items()
        }
        ready = time.perf_counter_ns()
        timings.compute_input_ns = ready - started
        timings.executed = True
        try:
            produced = self._session.run(feeds, request.outputs)
        finally:
            timings.compute_infer_ns = time.perf_counter_ns() - ready
        ran = time.perf_counter_ns()
        outputs = tuple(
            self._encode(self._signature.output(name), array, request.batch_size)
            for name, array in zip(request.outputs, produced, strict=True)
        )
        timings.compute_output_ns = time.perf_counter_ns() - ran
        return InferenceResult(outputs)

    def _to_model_shape(self, spec: TensorSpec | None, array: np.ndarray, batch: int) -> np.ndarray:
        assert spec is not None, "inputs were validated against the signature"
        if spec.model_dims is None:
            return array
        target = ([batch] if self._signature.batching else []) + list(spec.model_dims)
        try:
            return array.reshape(target)
        except ValueError:
            raise InvalidInputError(
                f"input '{spec.name}' of shape {format_shape(array.shape)} cannot be reshaped to "
                f"the model's shape {format_shape(target)}"
            ) from None

    def _encode(self, spec: TensorSpec | None, array: np.ndarray, batch: int) -> OutputTensor:
        assert spec is not None, "outputs were validated against the signature"
        batching = self._signature.batching
        expected = ([batch] if batching else []) + list(spec.dims)
        if spec.model_dims is not None:
            try:
                array = array.reshape(expected)
            except ValueError:
                raise self._mismatch(spec, array, expected) from None
        if array.ndim != len(expected) or any(
            want != -1 and got != want for got, want in zip(array.shape, expected, strict=True)
        ):
            raise self._mismatch(spec, array, expected)
        return OutputTensor(
            spec.name, spec.datatype.name, tuple(array.shape), encode_raw(spec.datatype, array)
        )

    def _mismatch(
        self, spec: TensorSpec, array: np.ndarray, expected: list[int]
    ) -> ModelExecutionError:
        return ModelExecutionError(
            f"{self._label} produced output '{spec.name}' with shape {format_shape(array.shape)}, "
            f"but its configuration declares {format_shape(expected)}"
        )


class InstancePool:
    """At most `count` executions of one model version at a time, in worker threads."""

    def __init__(self, runner: ModelRunner, count: int, thread_prefix: str) -> None:
        self._runner = runner
        self._executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix=thread_prefix)

    async def run(self, request: InferenceRequest, timings: RequestTimings) -> InferenceResult:
        """Execute in a worker thread, filling `timings` as it goes."""
        submitted = time.perf_counter_ns()

        def work() -> InferenceResult:
            timings.queue_ns = time.perf_counter_ns() - submitted
            return self._runner.execute(request, timings)

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, work)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
