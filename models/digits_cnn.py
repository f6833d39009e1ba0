"""A small CNN trained on scikit-learn's handwritten digits (8×8, ships with the package).

Data: 1,797 images, 10 classes; a stratified 80/20 split fixed by seed 0 gives
1,437 training and 360 held-out images. The model takes raw pixel intensities
(0 = background, 16 = ink, the data set's own scale) and returns class
probabilities; normalisation happens inside the graph so clients send pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from .common import ExportReport, ParityError, export_with_parity, max_abs_diff

NAME = "digits_cnn"
SEED = 0
TEST_FRACTION = 0.2
EPOCHS = 40
BATCH = 64


@dataclass(frozen=True)
class DigitsSplit:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_split() -> DigitsSplit:
    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None, :, :]  # [N, 1, 8, 8], 0..16
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=TEST_FRACTION, stratify=digits.target, random_state=SEED
    )
    return DigitsSplit(train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64))


class DigitsCNN(nn.Module):
    """Two 3×3 conv layers, max-pool, two dense layers; softmax output."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, 10),
        )

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(pixels / 16.0))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(pixels), dim=1)


def _shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augmentation: move each image by up to one pixel, filling with background."""
    padded = nn.functional.pad(batch, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (2,), generator=generator)
    row, column = int(offsets[0]), int(offsets[1])
    return padded[:, :, row : row + 8, column : column + 8]


def train(split: DigitsSplit) -> DigitsCNN:
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    x, y = torch.from_numpy(split.train_x), torch.from_numpy(split.train_y)
    generator = torch.Generator().manual_seed(SEED)
    for _ in tqdm(range(EPOCHS), desc="digits_cnn: training", unit="epoch"):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            index = order[start : start + BATCH]
            loss = nn.functional.cross_entropy(model.logits(_shift(x[index], generator)), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model.eval()


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def export(model: DigitsCNN, split: DigitsSplit, target: Path) -> ExportReport:
    with torch.no_grad():
        torch_probabilities = model(torch.from_numpy(split.test_x)).numpy()

    def check(session) -> ExportReport:  # type: ignore[no-untyped-def]
        onnx_probabilities = session.run(None, {"pixels": split.test_x})[0]
        report = ExportReport(
            opset=0,
            max_abs_diff=max_abs_diff(torch_probabilities, onnx_probabilities),
            torch_accuracy=accuracy(torch_probabilities, split.test_y),
            onnx_accuracy=accuracy(onnx_probabilities, split.test_y),
        )
        if report.max_abs_diff > 1e-4 or report.torch_accuracy != report.onnx_accuracy:
            raise ParityError(f"{NAME}: onnxruntime disagrees with torch: {report}")
        return report

    report = export_with_parity(
        model,
        (torch.from_numpy(split.test_x[:2]),),
        target,
        ["pixels"],
        ["probabilities"],
        {"pixels": {0: "batch"}, "probabilities": {0: "batch"}},
        check,
    )
    from .common import OPSET

    report.opset = OPSET
    return report
