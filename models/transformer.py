"""A small transformer encoder classifier trained on the generated review task.

Architecture: token embeddings plus fixed sinusoidal positional encodings,
pre-norm encoder layers with multi-head self-attention (written out with basic
tensor ops so the ONNX export is plain MatMul/Softmax), and a linear head on
the [CLS] position. Inputs are variable-length token-id sequences with an
attention mask; the graph has dynamic batch and sequence axes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import numpy as np
import torch
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from torch import nn
from tqdm import tqdm

from . import text_task
from .common import OPSET, ExportReport, ParityError, export_with_parity, max_abs_diff

NAME = "text_classifier"
SEED = 0
MAX_LENGTH = 64  # tokens, [CLS] included; positional table covers it
POSITIONS = 512  # longest sequence the graph accepts
WIDTH, HEADS, LAYERS, HIDDEN = 64, 4, 2, 128
EPOCHS, BATCH = 6, 64


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.project = nn.Linear(width, 3 * width)
        self.output = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        head_width = width // self.heads
        q, k, v = (
            self.project(x).reshape(batch, length, 3, self.heads, head_width).permute(2, 0, 3, 1, 4)
        )
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_width)
        scores = scores.masked_fill(keep[:, None, None, :] == 0, -1e4)
        mixed = torch.softmax(scores, dim=-1) @ v
        return self.output(mixed.transpose(1, 2).reshape(batch, length, width))


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads)
        self.feed_forward_norm = nn.LayerNorm(width)
        self.feed_forward = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        )

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), keep)
        return x + self.feed_forward(self.feed_forward_norm(x))


def sinusoidal_positions(count: int, width: int) -> torch.Tensor:
    position = torch.arange(count, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(1e4) / width))
    table = torch.zeros(count, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class TextClassifier(nn.Module):
    def __init__(self, vocabulary_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary_size, WIDTH, padding_idx=0)
        self.register_buffer("positions", sinusoidal_positions(POSITIONS, WIDTH))
        self.layers = nn.ModuleList(EncoderLayer(WIDTH, HEADS, HIDDEN) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, len(text_task.LABELS))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        positions = cast(torch.Tensor, self.positions)
        x = self.embedding(input_ids) + positions[:length]
        for layer in self.layers:
            x = layer(x, attention_mask)
        return self.head(self.norm(x[:, 0]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(input_ids, attention_mask), dim=-1)


def encode(tokenizer_path: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask, padded to the longest text (as the server does)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(MAX_LENGTH)
    encodings = tokenizer.encode_batch(texts)
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(texts), length), dtype=np.int64)
    mask = np.zeros((len(texts), length), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    return ids, mask


def train(split: text_task.TextSplit, tokenizer: Path) -> TextClassifier:
    model = TextClassifier(len(text_task.vocabulary()))
    ids, mask = encode(tokenizer, [e.text for e in split.train])
    labels = np.array([e.label for e in split.train], dtype=np.int64)
    steps = EPOCHS * math.ceil(len(labels) / BATCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    rng = np.random.default_rng(SEED)
    progress = tqdm(total=steps, desc="text_classifier: training", unit="step")
    for _ in range(EPOCHS):
        model.train()
        order = rng.permutation(len(labels))
        for start in range(0, len(order), BATCH):
            index = order[start : start + BATCH]
            length = int(mask[index].sum(axis=1).max())  # pad only to this batch's longest
            loss = nn.functional.cross_entropy(
                model.logits(
                    torch.from_numpy(ids[index, :length]), torch.from_numpy(mask[index, :length])
                ),
                torch.from_numpy(labels[index]),
            )
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            progress.update()
    progress.close()
    return model.eval()


def predict(model: TextClassifier, tokenizer: Path, texts: list[str]) -> np.ndarray:
    outputs = []
    with torch.no_grad():
        for start in range(0, len(texts), 256):
            ids, mask = encode(tokenizer, texts[start : start + 256])
            outputs.append(model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy())
    return np.concatenate(outputs)


def bag_of_words_accuracy(split: text_task.TextSplit) -> float:
    """The baseline that word order defeats: logistic regression on word counts."""
    vectorizer = CountVectorizer(token_pattern=r"[^ ]+", ngram_range=(1, 1))
    train_x = vectorizer.fit_transform([e.text for e in split.train])
    classifier = LogisticRegression(max_iter=2000).fit(train_x, [e.label for e in split.train])
    test_x = vectorizer.transform([e.text for e in split.test])
    return float(classifier.score(test_x, [e.label for e in split.test]))


def export(
    model: TextClassifier, split: text_task.TextSplit, tokenizer: Path, target: Path
) -> ExportReport:
    texts = [e.text for e in split.test]
    labels = np.array([e.label for e in split.test])
    torch_probabilities = predict(model, tokenizer, texts)

    def check(session) -> ExportReport:  # type: ignore[no-untyped-def]
        onnx_parts = []
        for start in range(0, len(texts), 256):
            ids, mask = encode(tokenizer, texts[start : start + 256])
            onnx_parts.append(session.run(None, {"input_ids": ids, "attention_mask": mask})[0])
        onnx_probabilities = np.concatenate(onnx_parts)
        report = ExportReport(
            opset=OPSET,
            max_abs_diff=max_abs_diff(torch_probabilities, onnx_probabilities),
            torch_accuracy=float(np.mean(torch_probabilities.argmax(1) == labels)),
            onnx_accuracy=float(np.mean(onnx_probabilities.argmax(1) == labels)),
        )
        if report.max_abs_diff > 1e-4 or report.torch_accuracy != report.onnx_accuracy:
            raise ParityError(f"{NAME}: onnxruntime disagrees with torch: {report}")
        return report

    ids, mask = encode(tokenizer, texts[:2])
    return export_with_parity(
        model,
        (torch.from_numpy(ids), torch.from_numpy(mask)),
        target,
        ["input_ids", "attention_mask"],
        ["probabilities"],
        {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "probabilities": {0: "batch"},
        },
        check,
    )
