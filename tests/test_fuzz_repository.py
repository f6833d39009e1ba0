"""Malformed config.pbtxt files and damaged ONNX files: a clear load error, never a crash."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.repository import ModelRegistry, VersionState
from service.settings import Settings
from tests import onnx_models as models

VALID_CONFIG = (
    'name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
    'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    "dynamic_batching { max_queue_delay_microseconds: 100 }\n"
    "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
)
MODEL_BYTES = models.scale(2.0, ["batch", 4]).SerializeToString()


def _load(config: str | None, model: bytes) -> tuple[str, str]:
    """Load one model from a fresh repository; (state, reason) of its version or model."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-repo-"))
    try:
        (root / "m" / "1").mkdir(parents=True)
        (root / "m" / "1" / "model.onnx").write_bytes(model)
        if config is not None:
            (root / "m" / "config.pbtxt").write_text(config, encoding="utf-8", errors="replace")
        registry = ModelRegistry(Settings(model_repository=root, metrics_port=-1))
        asyncio.run(registry.load_all())
        record = registry.records["m"]
        try:
            if record.reason:
                return "UNAVAILABLE", record.reason
            version = record.versions[1]
            return version.state.value, version.reason
        finally:
            registry.close()
            registry.join(5)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _assert_clear(state: str, reason: str, root_hint: str = "fuzz-repo-") -> None:
    assert state in (VersionState.READY.value, VersionState.UNAVAILABLE.value)
    if state == VersionState.UNAVAILABLE.value:
        assert reason.strip(), "a failed load must say why"
        assert "Traceback" not in reason
        assert root_hint not in reason, reason  # no server paths


@st.composite
def mutated_configs(draw: st.DrawFn) -> str:
    text = VALID_CONFIG
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["delete", "insert", "replace"]))
        if kind == "delete":
            end = min(len(text), position + draw(st.integers(1, 12)))
            text = text[:position] + text[end:]
        else:
            piece = draw(
                st.one_of(
                    st.text(max_size=6),
                    st.sampled_from(
                        ["{", "}", "[", "]", '"', "-1", "99999999999", "TYPE_STRING", "dims: [ ]"]
                    ),
                )
            )
            end = position + (draw(st.integers(0, 6)) if kind == "replace" else 0)
            text = text[:position] + piece + text[end:]
    return text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=mutated_configs())
def test_malformed_config_files_give_clear_load_errors(config: str) -> None:
    state, reason = _load(config, MODEL_BYTES)
    _assert_clear(state, reason)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(0, len(MODEL_BYTES)),
    flips=st.lists(
        st.tuples(st.integers(0, len(MODEL_BYTES) - 1), st.integers(1, 255)), max_size=4
    ),
)
def test_damaged_onnx_files_give_clear_load_errors(cut: int, flips: list[tuple[int, int]]) -> None:
    damaged = bytearray(MODEL_BYTES[:cut] if cut < len(MODEL_BYTES) else MODEL_BYTES)
    for position, mask in flips:
        if position < len(damaged):
            damaged[position] ^= mask
    state, reason = _load(None, bytes(damaged))
    _assert_clear(state, reason)
    if cut < len(MODEL_BYTES) // 2:
        assert state == VersionState.UNAVAILABLE.value


def test_the_fuzzed_files_start_from_a_model_that_loads() -> None:
    onnx.checker.check_model(onnx.load_from_string(MODEL_BYTES))
    assert _load(VALID_CONFIG, MODEL_BYTES) == ("READY", "")
