"""`make serve` serves models/repository: every model there must load and answer."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

from service.settings import Settings, embedded_repository
from tests.conftest import ServerThread


def test_every_embedded_model_is_ready_and_add_sub_answers() -> None:
    settings = Settings(grpc_host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=-1)
    assert settings.model_repository == embedded_repository()
    with ServerThread(settings) as server, server.client() as client:
        index = client.get_model_repository_index().models
        assert index, "the embedded repository is empty"
        assert all(entry.state == "READY" for entry in index), index
        a = np.arange(32, dtype=np.float32).reshape(2, 16)
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            tensor = grpcclient.InferInput(name, [2, 16], "FP32")
            tensor.set_data_from_numpy(a)
            inputs.append(tensor)
        result = client.infer("add_sub", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)
