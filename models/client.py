"""A client to copy: classify digit images and sentences, embed sentences, over gRPC.

    python -m models.client digit models/samples/digit_3.png
    python -m models.client classify "the soup was not great but the staff was lovely"
    python -m models.client embed "A man is playing guitar." "Someone plays an instrument."

Needs only `tritonclient[grpc]`, numpy and Pillow (`pip install -e '.[client]'`), and a
running server (`make serve`). `--url` points elsewhere (default localhost:8001).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient


def digit_pixels(path: Path) -> np.ndarray:
    """Any PNG -> the 8×8, 0..16, ink-is-high image the digits model was trained on."""
    from PIL import Image

    image = Image.open(path).convert("L").resize((8, 8), Image.Resampling.BOX)
    gray = np.asarray(image, dtype=np.float32) / 255.0
    ink = 1.0 - gray if gray.mean() > 0.5 else gray  # dark ink on light paper is common
    return (ink * 16.0)[None, None, :, :]


def classify_digits(client: grpcclient.InferenceServerClient, paths: list[Path]) -> None:
    batch = np.concatenate([digit_pixels(path) for path in paths])
    pixels = grpcclient.InferInput("pixels", list(batch.shape), "FP32")
    pixels.set_data_from_numpy(batch)
    probabilities = client.infer("digits_cnn", [pixels]).as_numpy("probabilities")
    for path, row in zip(paths, probabilities, strict=True):
        print(f"{path}: {int(row.argmax())} (p={row.max():.3f})")


def _text_input(sentences: list[str]) -> grpcclient.InferInput:
    array = np.array([[s.encode("utf-8")] for s in sentences], dtype=np.object_)
    text = grpcclient.InferInput("TEXT", list(array.shape), "BYTES")
    text.set_data_from_numpy(array)
    return text


def classify_text(client: grpcclient.InferenceServerClient, sentences: list[str]) -> None:
    probabilities = client.infer("text_classifier", [_text_input(sentences)]).as_numpy(
        "probabilities"
    )
    for sentence, row in zip(sentences, probabilities, strict=True):
        label = ("negative", "positive")[int(row.argmax())]
        print(f"{label} (p={row.max():.3f}): {sentence}")


def embed(client: grpcclient.InferenceServerClient, sentences: list[str]) -> None:
    embeddings = client.infer("minilm", [_text_input(sentences)]).as_numpy("embedding")
    print(f"{len(sentences)} embeddings of {embeddings.shape[1]} dimensions; cosine similarities:")
    similarity = embeddings @ embeddings.T
    for index, sentence in enumerate(sentences):
        row = " ".join(f"{value:6.3f}" for value in similarity[index])
        print(f"  {row}  {sentence}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.client", description=__doc__)
    parser.add_argument("--url", default="localhost:8001", help="server gRPC address")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("digit", help="classify PNG images of digits").add_argument(
        "images", nargs="+", type=Path
    )
    commands.add_parser("classify", help="classify reviews (text_classifier)").add_argument(
        "sentences", nargs="+"
    )
    commands.add_parser("embed", help="embed sentences (minilm)").add_argument(
        "sentences", nargs="+"
    )
    arguments = parser.parse_args(argv)
    with grpcclient.InferenceServerClient(arguments.url) as client:
        if arguments.command == "digit":
            classify_digits(client, arguments.images)
        elif arguments.command == "classify":
            classify_text(client, arguments.sentences)
        else:
            embed(client, arguments.sentences)
    return 0


if __name__ == "__main__":
    sys.exit(main())
