"""The embedded models: accuracy through the server, parity with torch, text input.

Accuracy is measured the way a user would see it: held-out data sent over gRPC
with tritonclient to a real server on models/repository.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from models import digits_cnn, text_task, transformer
from models.common import REPOSITORY, cpu_session
from service.settings import Settings
from tests.conftest import LAYOUTS, FrontendsServer, ServerThread
from tests.process import start_on_loopback

CHECKPOINTS = Path(__file__).resolve().parent.parent / "models" / "checkpoints"


@pytest.fixture(scope="module", params=LAYOUTS)
def embedded(request: pytest.FixtureRequest) -> Iterator[ServerThread | FrontendsServer]:
    """The embedded repository in one process, and behind two front ends (which tokenize)."""
    if request.param == LAYOUTS[0]:
        settings = Settings(
            model_repository=REPOSITORY,
            grpc_host="127.0.0.1",
            grpc_port=0,
            http_port=0,
            metrics_port=-1,
        )
        with ServerThread(settings) as server:
            yield server
        return
    frontends = FrontendsServer(start_on_loopback(REPOSITORY, "--frontend-processes", "2"))
    yield frontends
    assert frontends.stop() == 0, frontends.process.log


@pytest.fixture(scope="module")
def client(embedded: ServerThread | FrontendsServer) -> Iterator[grpcclient.InferenceServerClient]:
    with embedded.client() as connection:
        yield connection


@pytest.fixture(scope="module")
def text_split() -> text_task.TextSplit:
    return text_task.load_split()


def text_input(texts: list[str] | list[bytes], name: str = "TEXT") -> grpcclient.InferInput:
    array = np.array([[t.encode() if isinstance(t, str) else t] for t in texts], dtype=np.object_)
    tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def int_input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
    tensor.set_data_from_numpy(array)
    return tensor


def max_batch(client: grpcclient.InferenceServerClient, model: str) -> int:
    return int(client.get_model_config(model).config.max_batch_size)


# ------------------------------------------------------------- digits CNN ---


def test_digits_accuracy_through_the_server(client: grpcclient.InferenceServerClient) -> None:
    split = digits_cnn.load_split()
    step = max_batch(client, "digits_cnn")
    predictions = []
    for start in range(0, len(split.test_x), step):
        batch = split.test_x[start : start + step]
        pixels = grpcclient.InferInput("pixels", list(batch.shape), "FP32")
        pixels.set_data_from_numpy(batch)
        predictions.append(client.infer("digits_cnn", [pixels]).as_numpy("probabilities").argmax(1))
    accuracy = float(np.mean(np.concatenate(predictions) == split.test_y))
    assert len(split.test_y) == 360
    assert accuracy >= 0.98, accuracy


def test_digits_parity_with_torch() -> None:
    split = digits_cnn.load_split()
    model = digits_cnn.DigitsCNN()
    model.load_state_dict(torch.load(CHECKPOINTS / "digits_cnn.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(split.test_x)).numpy()
    session = cpu_session(REPOSITORY / "digits_cnn" / "1" / "model.onnx")
    produced = session.run(None, {"pixels": split.test_x})[0]
    assert np.max(np.abs(produced - expected)) <= 1e-4
    assert np.array_equal(produced.argmax(1), expected.argmax(1))


# -------------------------------------------------------- text classifier ---


def test_text_classifier_accuracy_through_the_server(
    client: grpcclient.InferenceServerClient, text_split: text_task.TextSplit
) -> None:
    step = min(max_batch(client, "text_classifier"), 256)
    texts = [e.text for e in text_split.test]
    labels = np.array([e.label for e in text_split.test])
    predictions = []
    for start in range(0, len(texts), step):
        result = client.infer("text_classifier", [text_input(texts[start : start + step])])
        predictions.append(result.as_numpy("probabilities").argmax(1))
    accuracy = float(np.mean(np.concatenate(predictions) == labels))
    assert len(texts) == 4000
    assert accuracy >= 0.97, accuracy


def test_bag_of_words_baseline_is_clearly_worse(text_split: text_task.TextSplit) -> None:
    assert transformer.bag_of_words_accuracy(text_split) < 0.7


def test_text_classifier_parity_with_torch(text_split: text_task.TextSplit) -> None:
    tokenizer = REPOSITORY / "text_classifier" / "tokenizer.json"
    model = transformer.TextClassifier(len(text_task.vocabulary()))
    model.load_state_dict(torch.load(CHECKPOINTS / "text_classifier.pt", weights_only=True))
    model.eval()
    texts = [e.text for e in text_split.test[:1000]]
    expected = transformer.predict(model, tokenizer, texts)
    ids, mask = transformer.encode(tokenizer, texts)
    produced = cpu_session(REPOSITORY / "text_classifier" / "1" / "model.onnx").run(
        None, {"input_ids": ids, "attention_mask": mask}
    )[0]
    assert np.max(np.abs(produced - expected)) <= 1e-4
    assert np.array_equal(produced.argmax(1), expected.argmax(1))


def test_text_and_token_ids_give_the_same_result(
    client: grpcclient.InferenceServerClient, text_split: text_task.TextSplit
) -> None:
    texts = [e.text for e in text_split.test[:32]]
    tokenizer = REPOSITORY / "text_classifier" / "tokenizer.json"
    ids, mask = transformer.encode(tokenizer, texts)
    from_text = client.infer("text_classifier", [text_input(texts)]).as_numpy("probabilities")
    from_ids = client.infer(
        "text_classifier", [int_input("input_ids", ids), int_input("attention_mask", mask)]
    ).as_numpy("probabilities")
    np.testing.assert_allclose(from_text, from_ids, atol=1e-6)


def test_empty_and_unusual_strings_are_served(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer(
        "text_classifier", [text_input(["", "   ", "UNKNOWN WORDS ONLY ✓", "the food was good"])]
    ).as_numpy("probabilities")
    assert result.shape == (4, 2)
    np.testing.assert_allclose(result.sum(1), 1.0, atol=1e-5)


def test_too_long_text_is_truncated_as_documented(client: grpcclient.InferenceServerClient) -> None:
    """Beyond max_sequence_length (64 tokens) the text is cut; what follows cannot matter."""
    head = "the food was not good but the staff was lovely"
    filler = " and the music was great" * 20
    long_a = client.infer("text_classifier", [text_input([head + filler])])
    long_b = client.infer("text_classifier", [text_input([head + filler + " ! bad bad bad"])])
    np.testing.assert_array_equal(
        long_a.as_numpy("probabilities"), long_b.as_numpy("probabilities")
    )


@pytest.mark.parametrize(
    ("inputs", "fragments"),
    [
        (lambda: [text_input([b"\xff\xfe not text"])], ["'TEXT' element 0 is not valid UTF-8"]),
        (
            lambda: [
                text_input(["ok"]),
                int_input("input_ids", np.ones((1, 3), np.int64)),
                int_input("attention_mask", np.ones((1, 3), np.int64)),
            ],
            ["either input 'TEXT'", "not both"],
        ),
        (
            lambda: [int_input("input_ids", np.ones((1, 3), np.int64))],
            ["needs token input(s) 'attention_mask'"],
        ),
        (
            lambda: [
                int_input("input_ids", np.ones((1, 65), np.int64)),
                int_input("attention_mask", np.ones((1, 65), np.int64)),
            ],
            ["'attention_mask' has 65 tokens", "at most 64"],
        ),
        (
            lambda: [
                int_input("input_ids", np.ones((1, 3), np.int64)),
                int_input("attention_mask", np.ones((1, 4), np.int64)),
            ],
            ["ties both to its dimension 'sequence'"],
        ),
    ],
    ids=["invalid-utf8", "both", "partial-tokens", "too-many-tokens", "mismatched-lengths"],
)
def test_malformed_text_requests(
    client: grpcclient.InferenceServerClient,
    inputs,
    fragments: list[str],  # type: ignore[no-untyped-def]
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("text_classifier", inputs())
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    for fragment in fragments:
        assert fragment in caught.value.message(), caught.value.message()


def test_no_input_names_both_options(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("text_classifier", [])
    assert "needs input 'TEXT' (one string per row) or the token inputs" in caught.value.message()


def test_text_input_in_metadata_and_config(client: grpcclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("text_classifier")
    assert next((t.name, t.datatype, list(t.shape)) for t in metadata.inputs) == (
        "TEXT",
        "BYTES",
        [-1, 1],
    )
    config = client.get_model_config("text_classifier").config
    assert {i.name: i.optional for i in config.input} == {
        "input_ids": True,
        "attention_mask": True,
        "TEXT": True,
    }


def test_model_cards_and_configs_are_complete() -> None:
    for name in ("digits_cnn", "text_classifier"):
        card = (REPOSITORY / name / "README.md").read_text()
        for heading in (
            "## Data",
            "## Results",
            "## Inputs and outputs",
            "## Example call",
            "## Batching",
        ):
            assert heading in card, (name, heading)
        config = (REPOSITORY / name / "config.pbtxt").read_text()
        assert "max_batch_size" in config and "preferred_batch_size" in config


def test_client_example_reads_png_and_text(
    embedded: ServerThread | FrontendsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from models import client as example

    samples = Path(__file__).resolve().parent.parent / "models" / "samples"
    assert (
        example.main(
            ["--url", embedded.url, "digit", *(str(samples / f"digit_{d}.png") for d in range(10))]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1][0] for line in lines] == [str(d) for d in range(10)]
    assert (
        example.main(
            ["--url", embedded.url, "classify", "the view was not great but the staff was lovely"]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("negative")


def test_training_is_reproducible(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seed, same weights, bit for bit (two short runs of the real training loop)."""
    from models.common import seed_everything

    monkeypatch.setattr(digits_cnn, "EPOCHS", 2)
    split = digits_cnn.load_split()
    weights = []
    for _ in range(2):
        seed_everything(0)
        weights.append(digits_cnn.train(split).state_dict())
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


def test_export_refuses_to_write_a_model_that_fails_parity(tmp_path: Path) -> None:
    from models.common import ExportReport, ParityError, export_with_parity

    def disagree(session: object) -> ExportReport:
        raise ParityError("onnxruntime and torch disagree")

    target = tmp_path / "model" / "1" / "model.onnx"
    with pytest.raises(ParityError):
        export_with_parity(
            digits_cnn.DigitsCNN(),
            (torch.zeros(1, 1, 8, 8),),
            target,
            ["pixels"],
            ["probabilities"],
            {"pixels": {0: "batch"}},
            disagree,
        )
    assert not target.exists()


@pytest.mark.parametrize("bad", [-1, "size"])
def test_token_ids_outside_the_vocabulary_are_refused(
    client: grpcclient.InferenceServerClient, bad: int | str
) -> None:
    """A negative id would be read from the end of the embedding table; one past the end
    would fail inside onnxruntime."""
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(
        str(REPOSITORY / "text_classifier" / "tokenizer.json")
    ).get_vocab_size(with_added_tokens=True)
    ids = np.array([[1, 2, size - 1, -1 if bad == -1 else size]], dtype=np.int64)
    mask = np.ones_like(ids)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(
            "text_classifier", [int_input("input_ids", ids), int_input("attention_mask", mask)]
        )
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    wrong = -1 if bad == -1 else size
    assert (
        f"input 'input_ids' holds token id {wrong}; ids must lie in [0, {size})"
        in refused.value.message()
    )
    ids[0, 3] = size - 1  # the largest id is fine
    client.infer(
        "text_classifier", [int_input("input_ids", ids), int_input("attention_mask", mask)]
    )
