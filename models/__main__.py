"""`python -m models build [--only NAME ...]`: retrain and re-export the embedded models."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .build import BUILDERS, build


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "build", help="train, export with parity checks, write the repository"
    )
    run.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BUILDERS),
        default=list(BUILDERS),
        help="build only these models",
    )
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    results = build(arguments.only)
    for name, figures in results.items():
        accuracy = figures.get("onnx_accuracy")
        parity = figures["extra"].get("min_cosine", figures["max_abs_diff"])
        sys.stderr.write(
            f"{name}: "
            + (f"accuracy {accuracy:.4f}, " if accuracy is not None else "")
            + f"parity {parity:.3g}, max_batch_size {figures['max_batch_size']}, "
            f"preferred {figures['preferred_batch_size']}, "
            f"{figures['build_seconds']}s\n"
        )
    sys.stderr.write(f"all done in {time.perf_counter() - started:.0f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
