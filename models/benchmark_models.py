"""Models the benchmark serves besides the trained ones: realistic shapes, random weights.

* `mnist_cnn`: the classic MNIST convnet on 1×28×28 (two 3×3 conv layers, max-pool,
  two dense layers; 1.2M parameters).
* `resnet18`: ResNet-18 on 3×224×224 (11.7M parameters), written out here since
  torchvision does not install beside this torch build.

Weights are seeded random: the benchmark measures serving, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .common import OPSET


class MnistCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 12 * 12, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.layers(image), dim=1)


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        width = 64
        for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [BasicBlock(width, outputs, stride), BasicBlock(outputs, outputs, 1)]
            width = outputs
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.stages(self.stem(image))), dim=1)


def export(name: str, folder: Path) -> Path:
    """Write <folder>/<name>/1/model.onnx (seeded random weights) and return its path."""
    import warnings

    torch.manual_seed(0)
    module, shape = {
        "mnist_cnn": (MnistCNN(), (1, 28, 28)),
        "resnet18": (ResNet18(), (3, 224, 224)),
    }[name]
    module.eval()
    target = folder / name / "1" / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(1, *shape),),
            str(target),
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return target
