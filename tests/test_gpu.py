"""On a real NVIDIA GPU: every embedded model on CUDA agrees with the CPU, and says it runs on CUDA.

Marked `gpu`; skipped (with the reason) where onnxruntime has no CUDA provider
or no GPU is visible, which is the case in CI. `python scripts/gpu_check.py`
runs these on a GPU machine. Timing (warm-up's effect on first requests) is
measured by scripts/gpu_benchmark.py, not asserted here.
"""

from __future__ import annotations

import re
import shutil
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from service.gpu import visible_gpu_count
from service.placement import CUDA
from service.runtime import available_providers
from service.settings import embedded_repository
from service.warmup import batch_sizes, sequence_lengths
from tests import onnx_models as models
from tests.conftest import ServerThread, serve

CUDA_USABLE = CUDA in available_providers() and visible_gpu_count() != 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not CUDA_USABLE,
        reason="needs onnxruntime-gpu with CUDA and a visible NVIDIA GPU "
        f"(providers here: {', '.join(available_providers())})",
    ),
]

TEXTS = [
    "GPUs make batching pay",
    "a second, rather longer sentence about serving transformer models on accelerators",
    "short",
]
RNG = np.random.default_rng(7)
# Per model: the inputs a client sends (fresh random values for numeric ones).
REQUESTS = {
    "add_sub": lambda: {
        "INPUT0": RNG.standard_normal((3, 16)).astype(np.float32),
        "INPUT1": RNG.standard_normal((3, 16)).astype(np.float32),
    },
    "digits_cnn": lambda: {"pixels": (RNG.random((5, 1, 8, 8)) * 16).astype(np.float32)},
    "text_classifier": lambda: {"TEXT": np.array([[t.encode()] for t in TEXTS], dtype=object)},
    "minilm": lambda: {"TEXT": np.array([[t.encode()] for t in TEXTS], dtype=object)},
}
CPU_GROUP = "instance_group [ { count: 1 kind: KIND_CPU } ]"


def _gpu_copy(source: Path, target: Path) -> Path:
    """The embedded repository with every model moved to KIND_GPU."""
    shutil.copytree(source, target, symlinks=False)
    for config in target.glob("*/config.pbtxt"):
        text = config.read_text()
        assert CPU_GROUP in text, f"{config} no longer uses the instance_group this test edits"
        config.write_text(text.replace(CPU_GROUP, "instance_group [ { count: 1 kind: KIND_GPU } ]"))
    return target


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerThread, ServerThread]]:
    source = embedded_repository()
    gpu_repository = _gpu_copy(source, tmp_path_factory.mktemp("gpu") / "repository")
    with serve(source) as cpu, serve(gpu_repository) as gpu:
        yield cpu, gpu


def _infer(
    server: ServerThread, model: str, arrays: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    with server.client() as client:
        metadata = client.get_model_metadata(model, as_json=True)
        datatypes = {tensor["name"]: tensor["datatype"] for tensor in metadata["inputs"]}
        inputs = []
        for name, array in arrays.items():
            tensor = grpcclient.InferInput(name, list(array.shape), datatypes[name])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer(model, inputs)
        outputs = {}
        for output in metadata["outputs"]:
            value = result.as_numpy(output["name"])
            assert value is not None
            outputs[output["name"]] = value
        return outputs


def _models() -> list[str]:
    present = {path.parent.name for path in embedded_repository().glob("*/config.pbtxt")}
    return sorted(present)


@pytest.mark.parametrize("model", _models())
def test_every_model_on_cuda_matches_the_cpu(
    servers: tuple[ServerThread, ServerThread], model: str
) -> None:
    cpu, gpu = servers
    assert gpu.server.registry.is_ready(model), gpu.server.registry.record(model).reason
    arrays = REQUESTS[model]()
    expected = _infer(cpu, model, arrays)
    produced = _infer(gpu, model, arrays)
    for name, reference in expected.items():
        got = produced[name]
        assert got.shape == reference.shape
        assert np.all(np.isfinite(got))
        relative = np.linalg.norm(got - reference) / max(np.linalg.norm(reference), 1e-30)
        assert relative <= 1e-3, f"{model}.{name}: relative difference {relative:.2e}"


def test_the_provider_in_use_is_cuda_in_config_metrics_and_gpu_gauges(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    _, gpu = servers
    with gpu.client() as client:
        for model in _models():
            config = client.get_model_config(model, as_json=True)["config"]
            assert config["instance_group"][0]["kind"] == "KIND_GPU"
            parameters = config["parameters"]
            assert parameters["execution_provider"]["string_value"] == CUDA
            assert parameters["execution_devices"]["string_value"] == "GPU 0"
    url = f"http://127.0.0.1:{gpu.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for model in _models():
        assert (
            f'batchwise_model_execution_info{{device="GPU 0",model="{model}",'
            f'provider="{CUDA}",version="1"}} 1.0' in text
        )
    total = re.search(r'^nv_gpu_memory_total_bytes\{gpu_uuid="GPU-[^"]+"\} (\S+)$', text, re.M)
    used = re.search(r'^batchwise_gpu_memory_used_bytes\{gpu="0",uuid="[^"]+"\} (\S+)$', text, re.M)
    utilization = re.search(r"^nv_gpu_utilization\{[^}]+\} (\S+)$", text, re.M)
    assert total and used and utilization, "NVML gauges missing (is nvidia-ml-py installed?)"
    assert 0 < float(used.group(1)) < float(total.group(1))
    assert 0.0 <= float(utilization.group(1)) <= 1.0


def test_gpu_models_were_warmed_up_at_every_shape_the_batcher_forms(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    cpu, gpu = servers
    for model in _models():
        version = gpu.server.registry.resolve(model, "")
        report = version.warmup
        assert report is not None and report.failure is None, model
        config = version.config
        session_graph = version.sessions[0].graph
        planned = len(batch_sizes(config, every_size=True)) * len(
            sequence_lengths(config, session_graph)
        )
        # Every planned shape once on every instance thread.
        assert report.runs == planned * version.scheduler.instances and report.seconds > 0
        # Default --warmup gpu: CPU models are not warmed up.
        assert cpu.server.registry.resolve(model, "").warmup is None


def test_a_gpu_index_that_does_not_exist_fails_the_load_clearly(tmp_path: Path) -> None:
    count = visible_gpu_count()
    assert count is not None
    models.save(
        models.scale(2.0, ["batch", 4]),
        tmp_path,
        "elsewhere",
        config=(
            'name: "elsewhere"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
            f"instance_group [ {{ kind: KIND_GPU gpus: [ {count} ] }} ]\n"
        ),
    )
    with serve(tmp_path) as server, server.client() as client:
        (entry,) = client.get_model_repository_index(as_json=True)["models"]
        assert f"asks for GPU {count} but {count} GPU(s) are visible" in entry["reason"]


def test_io_binding_and_plain_runs_agree(tmp_path: Path) -> None:
    repository = _gpu_copy(embedded_repository(), tmp_path / "repository")
    arrays = REQUESTS["digits_cnn"]()
    with serve(repository, cuda_io_binding=False, warmup="off") as plain:
        expected = _infer(plain, "digits_cnn", arrays)
    with serve(repository, warmup="off") as bound:
        produced = _infer(bound, "digits_cnn", arrays)
    np.testing.assert_allclose(produced["probabilities"], expected["probabilities"], rtol=1e-6)


def test_concurrent_batches_are_merged_in_page_locked_memory_and_match_the_cpu(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    """Batches merged on a GPU instance go through a pinned (cudaHostAlloc) staging buffer."""
    cpu, gpu = servers
    version = gpu.server.registry.resolve("digits_cnn", "")
    before = version.stats.snapshot()
    requests = [REQUESTS["digits_cnn"]() for _ in range(256)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        produced = list(pool.map(lambda arrays: _infer(gpu, "digits_cnn", arrays), requests))
    after = version.stats.snapshot()
    merged = (after.success.count - before.success.count) - (
        after.execution_count - before.execution_count
    )
    assert merged > 0, "no two requests were batched together; nothing was staged"
    for arrays, got in zip(requests, produced, strict=True):
        reference = _infer(cpu, "digits_cnn", arrays)["probabilities"]
        relative = np.linalg.norm(got["probabilities"] - reference) / np.linalg.norm(reference)
        assert relative <= 1e-3
    runner = version.runner
    areas = version.scheduler.on_every_instance(runner.thread_staging)
    assert all(area.pinned and area.failed is None for area in areas), [a.failed for a in areas]
    assert sum(area.held_bytes for area in areas) > 0
