"""all-MiniLM-L6-v2 exported by our build code and served: parity with sentence-transformers.

The ~90 MB export is not committed, so this module exports it into a temporary
repository with the same code `python -m models build` runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from models import minilm
from models.build import _minilm_config
from models.common import BatchingChoice
from tests.conftest import ServerThread, serve


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("minilm_repository")
    report = minilm.export(root / "minilm" / "1" / "model.onnx")
    assert report.extra["min_cosine"] >= minilm.COSINE_TARGET
    (root / "minilm" / "config.pbtxt").write_text(_minilm_config(BatchingChoice(32, 1)))
    with serve(root) as server:
        yield server


def _text(sentences: list[str]) -> grpcclient.InferInput:
    array = np.array([[s.encode()] for s in sentences], dtype=np.object_)
    tensor = grpcclient.InferInput("TEXT", list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def test_served_embeddings_match_sentence_transformers(minilm_server: ServerThread) -> None:
    sentences = minilm.SENTENCES
    reference = minilm.reference_embeddings(sentences)
    with minilm_server.client() as client:
        # one request per sentence and one request with all of them: padding must not matter
        single = np.concatenate(
            [client.infer("minilm", [_text([s])]).as_numpy("embedding") for s in sentences]
        )
        together = client.infer("minilm", [_text(sentences[:16])]).as_numpy("embedding")
    for produced in (single, np.concatenate([together, single[16:]])):
        cosine = np.sum(produced * reference, axis=1) / (
            np.linalg.norm(produced, axis=1) * np.linalg.norm(reference, axis=1)
        )
        assert cosine.min() >= 0.9999, cosine
        np.testing.assert_allclose(np.linalg.norm(produced, axis=1), 1.0, atol=1e-5)


def test_token_ids_give_the_same_embedding(minilm_server: ServerThread) -> None:
    sentences = ["A man is playing guitar.", "Someone plays an instrument, loudly."]
    tokens = minilm.tokenize(
        Path(minilm_server.settings.model_repository) / "minilm" / "tokenizer.json", sentences
    )
    inputs = []
    for name, array in tokens.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with minilm_server.client() as client:
        from_ids = client.infer("minilm", inputs).as_numpy("embedding")
        from_text = client.infer("minilm", [_text(sentences)]).as_numpy("embedding")
    np.testing.assert_allclose(from_ids, from_text, atol=1e-6)
