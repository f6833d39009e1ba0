"""Generate service/protocol/*_pb2.py(i) from proto/*.proto, or check they are current.

Why post-processing: protoc's Python output registers messages in protobuf's
process-wide default descriptor pool. tritonclient registers its own copy of the
same `inference.*` names there, so the two could not be imported into one
process (our tests do exactly that, and so might a user's test harness). We
rewrite the generated modules to register into a private pool
(`service/protocol/_pool.py`) and to import each other relatively.

Usage:
    python scripts/generate_protocol.py          # regenerate in place
    python scripts/generate_protocol.py --check  # exit 1 if the committed code is stale

The output depends on the protoc bundled with grpcio-tools, which is pinned in
pyproject's `dev` extra so that every machine produces identical bytes.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUTPUT_DIR = ROOT / "service" / "protocol"
PROTO_FILES = ("model_config.proto", "grpc_service.proto")
HEADER = "# Generated from proto/ by scripts/generate_protocol.py. Do not edit.\n"


def _rewrite(text: str, module_names: list[str]) -> str:
    """Point generated code at the private pool and at sibling modules."""
    text = text.replace(
        "_descriptor_pool.Default()",
        "_private_pool.POOL",
    )
    text = text.replace(
        "from google.protobuf import descriptor_pool as _descriptor_pool\n",
        "from . import _pool as _private_pool\n",
    )
    for name in module_names:
        text = re.sub(
            rf"^import {name} as (\w+)$",
            rf"from . import {name} as \1",
            text,
            flags=re.MULTILINE,
        )
    return HEADER + text


def generate(into: Path) -> list[Path]:
    from grpc_tools import protoc  # dev-only dependency

    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={into}",
        f"--pyi_out={into}",
        *[str(PROTO_DIR / name) for name in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    module_names = [name.removesuffix(".proto") + "_pb2" for name in PROTO_FILES]
    written = []
    for path in sorted(into.glob("*_pb2.py*")):
        path.write_text(_rewrite(path.read_text(), module_names))
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            target = OUTPUT_DIR / path.name
            if options.check:
                if not target.exists() or target.read_bytes() != path.read_bytes():
                    stale.append(target.relative_to(ROOT))
            else:
                target.write_bytes(path.read_bytes())
        if stale:
            print("stale generated protocol code (run scripts/generate_protocol.py):")
            for item in stale:
                print(f"  {item}")
            return 1
    if not options.check:
        print(f"wrote {len(fresh)} files to {OUTPUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
