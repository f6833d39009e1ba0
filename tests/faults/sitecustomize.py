"""Fault injection for server processes started by the tests (never imported otherwise).

A test puts this folder on PYTHONPATH and sets BATCHWISE_TEST_FAULT; Python
imports sitecustomize at start-up. With "cuda", onnxruntime fails the way the
CUDA provider does after a device fault, but only for inputs whose first
element is 13.0, so the server first loads and serves normally.
"""

from __future__ import annotations

import os
from typing import Any

if os.environ.get("BATCHWISE_TEST_FAULT") == "cuda":
    import numpy as np
    import onnxruntime

    _run = onnxruntime.InferenceSession.run

    def _faulty_run(self: Any, output_names: Any, feeds: Any, *args: Any, **kwargs: Any) -> Any:
        if any(
            np.asarray(value).size and np.asarray(value).flat[0] == 13.0 for value in feeds.values()
        ):
            raise RuntimeError(
                "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 700: an illegal memory access was "
                "encountered ; GPU=0 ; expr=cudaStreamSynchronize(stream)"
            )
        return _run(self, output_names, feeds, *args, **kwargs)

    onnxruntime.InferenceSession.run = _faulty_run  # type: ignore[method-assign]
