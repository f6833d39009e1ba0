"""The benchmark's models, the repositories both servers serve, and raw onnxruntime's best.

Configs are what a user writes first: `max_batch_size` and
`dynamic_batching { max_queue_delay_microseconds: 5000 }`, nothing tuned
(`<model>`), and the same without dynamic batching (`<model>_single`). The
naive server gets its own repository holding only the plain models.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_clients import InputSpec, feeds

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench"
MAX_DELAY_US = 5000
MINILM_LENGTH = 128
MIXED = "minilm_mixed"  # MiniLM with lengths 16..128: padded batching, Python client only


@dataclass(frozen=True)
class ModelSpec:
    inputs: InputSpec
    max_batch: int
    # Runs take tens of milliseconds: measured over `heavy` times as long.
    heavy: int = 1
    padding: str = ""


MODELS: dict[str, ModelSpec] = {
    "mnist_cnn": ModelSpec({"image": ("FP32", (1, 28, 28))}, 64),
    "resnet18": ModelSpec({"image": ("FP32", (3, 224, 224))}, 32, heavy=2),
    "minilm": ModelSpec(
        {n: ("INT64", (-1,)) for n in ("input_ids", "attention_mask", "token_type_ids")},
        32,
        heavy=2,
    ),
    MIXED: ModelSpec(
        {n: ("INT64", (-1,)) for n in ("input_ids", "attention_mask", "token_type_ids")},
        32,
        heavy=2,
        padding="input_ids:0, attention_mask:0, token_type_ids:0",
    ),
}


def source_name(model: str) -> str:
    return model.replace("_mixed", "")


def variable_shapes(model: str) -> dict[str, int]:
    """perf_analyzer's --shape for the model's variable dims (MiniLM's sequence)."""
    return {n: MINILM_LENGTH for n, (_, shape) in MODELS[model].inputs.items() if -1 in shape}


def config_text(name: str, spec: ModelSpec, batching: bool) -> str:
    inputs = ",\n".join(
        f'  {{ name: "{n}" data_type: TYPE_{t} dims: [ {", ".join(str(d) for d in shape)} ] }}'
        for n, (t, shape) in spec.inputs.items()
    )
    lines = [f'name: "{name}"', f"max_batch_size: {spec.max_batch}", f"input [\n{inputs}\n]"]
    if batching:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {MAX_DELAY_US} }}")
    if spec.padding:
        lines.append(f'parameters {{ key: "padding" value: {{ string_value: "{spec.padding}" }} }}')
    return "\n".join(lines) + "\n"


def prepare_sources(models: list[str]) -> None:
    """<cache>/sources/<model>/1/model.onnx for every model to measure."""
    from models import benchmark_models

    sources = CACHE / "sources"
    for name in {source_name(m) for m in models}:
        onnx = sources / name / "1" / "model.onnx"
        if onnx.exists():
            continue
        if name in ("mnist_cnn", "resnet18"):
            benchmark_models.export(name, sources)
        elif name == "minilm" and (ROOT / "models/repository/minilm/1/model.onnx").exists():
            onnx.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / "models/repository/minilm/1/model.onnx", onnx)
        elif name == "minilm":
            from models import minilm

            minilm.export(onnx)
        else:
            onnx.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f"models/repository/{name}/1/model.onnx", onnx)


def onnx_path(model: str) -> Path:
    return CACHE / "sources" / source_name(model) / "1" / "model.onnx"


def _link(model: str, folder: Path) -> None:
    (folder / "1").mkdir(parents=True)
    os.link(onnx_path(model), folder / "1" / "model.onnx")


def write_repositories(models: list[str]) -> tuple[Path, Path]:
    """(the project's repository: `<m>` and `<m>_single`; the naive server's: plain `<m>`)."""
    ours, naive = CACHE / "repository", CACHE / "naive-repository"
    for root in (ours, naive):
        shutil.rmtree(root, ignore_errors=True)
    for model in models:
        spec = MODELS[model]
        for suffix, batching in (("", True), ("_single", False)):
            folder = ours / f"{model}{suffix}"
            _link(model, folder)
            (folder / "config.pbtxt").write_text(config_text(f"{model}{suffix}", spec, batching))
        folder = naive / model
        _link(model, folder)
        (folder / "config.pbtxt").write_text(config_text(model, spec, batching=False))
    return ours, naive


# ------------------------------------------------------------ raw onnxruntime ---


@dataclass
class Raw:
    model: str
    best_items_per_second: float
    batch_size: int
    threads: int
    table: list[dict[str, float]] = field(default_factory=list)


_SESSIONS: dict[tuple[str, int], Any] = {}


def _session(model: str, threads: int) -> Any:
    import onnxruntime as ort

    key = (source_name(model), threads)
    if key not in _SESSIONS:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        _SESSIONS[key] = ort.InferenceSession(
            str(onnx_path(model)), options, providers=["CPUExecutionProvider"]
        )
    return _SESSIONS[key]


def _rate(model: str, threads: int, rows: int, seconds: float) -> float:
    session = _session(model, threads)
    data = feeds(MODELS[model].inputs, rows, MINILM_LENGTH)
    session.run(None, data)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or count < 2:
        session.run(None, data)
        count += 1
    return count * rows / (time.perf_counter() - started)


def measure_raw(model: str, seconds: float) -> Raw:
    """onnxruntime in this process, 1 and 2 threads, every power-of-two batch size."""
    best = Raw(model, 0.0, 0, 0)
    sizes = [s for s in (1, 2, 4, 8, 16, 32, 64) if s <= MODELS[model].max_batch]
    for threads in (1, 2):
        for size in sizes:
            rate = _rate(model, threads, size, seconds / len(sizes))
            best.table.append({"threads": threads, "batch": size, "items_per_second": rate})
            if rate > best.best_items_per_second:
                best.best_items_per_second, best.batch_size, best.threads = rate, size, threads
    return best


def raw_at(model: str, best: Raw, seconds: float) -> float:
    """onnxruntime's throughput at the best setting found, measured again now."""
    return _rate(model, best.threads, best.batch_size, seconds)


def mixed_lengths(count: int) -> list[int]:
    import numpy as np

    return [int(n) for n in np.random.default_rng(7).integers(16, 129, count)]


def raw_one_by_one(lengths: list[int]) -> float:
    """The mixed-length bar: the same requests, one session.run each, in-process."""
    session = _session(MIXED, 2)
    prepared = [feeds(MODELS[MIXED].inputs, 1, n) for n in lengths]
    session.run(None, prepared[0])
    started = time.perf_counter()
    for data in prepared:
        session.run(None, data)
    return len(prepared) / (time.perf_counter() - started)
