"""The GPU variant of deploy/Dockerfile, built and run where there is no GPU.

Opt-in (`BATCHWISE_TEST_GPU_IMAGE=1 pytest -m docker tests/test_docker_gpu_image.py`): each
build downloads onnxruntime-gpu (~300 MB), too much for every run. The image is
built on the Debian base the stack test uses, since the nvidia/cuda base cannot
be pulled everywhere; what it proves is that the `gpu` variant installs and
imports, and that such an image on a machine without a GPU or driver (a CPU node
in a mixed cluster) serves the models that leave the device to the server and
refuses, with the reason, those that demand a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.docker_engine import DockerEngine, EngineUnavailableError, import_base_image
from tests.process import ROOT

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(
        os.environ.get("BATCHWISE_TEST_GPU_IMAGE") != "1",
        reason="opt-in: set BATCHWISE_TEST_GPU_IMAGE=1 (downloads onnxruntime-gpu)",
    ),
]
IMAGE = "batchwise-e2e/server:gpu-test"

# Runs inside the image: two copies of the embedded add_sub, one KIND_AUTO and one KIND_GPU.
SERVE_BOTH_KINDS = r"""
import pathlib, shutil, subprocess
root = pathlib.Path("/tmp/repository")
for name, kind in (("auto_model", "KIND_AUTO"), ("gpu_model", "KIND_GPU")):
    shutil.copytree("/models/add_sub", root / name)
    config = root / name / "config.pbtxt"
    config.write_text(config.read_text().replace("add_sub", name).replace("KIND_CPU", kind))
run = subprocess.run(
    ["timeout", "30", "batchwise", "serve", "--model-repository", str(root), "--grpc-port", "0",
     "--http-port", "0", "--metrics-port", "-1", "--shutdown-grace-seconds", "1"],
    capture_output=True, text=True,
)
print(run.stdout + run.stderr)
"""


@pytest.fixture(scope="module")
def gpu_image() -> Iterator[tuple[DockerEngine, str]]:
    try:
        engine = DockerEngine.start()
    except EngineUnavailableError as reason:
        pytest.skip(f"no Docker engine here: {reason}")
    try:
        base = import_base_image(engine, "batchwise-e2e/base", "bookworm")
        with engine.client() as client:
            client.images.build(
                path=str(ROOT),
                dockerfile="deploy/Dockerfile",
                buildargs={"BASE_IMAGE": base, "ONNXRUNTIME": "gpu"},
                tag=IMAGE,
                rm=True,
                forcerm=True,
            )
        yield engine, IMAGE
    finally:
        engine.stop()


def _run(engine: DockerEngine, image: str, code: str) -> str:
    with engine.client() as client:
        output = client.containers.run(image, entrypoint=["python", "-c", code], remove=True)
    return output.decode() if isinstance(output, bytes) else str(output)


def test_the_gpu_variant_installs_onnxruntime_gpu_and_nvml(
    gpu_image: tuple[DockerEngine, str],
) -> None:
    output = _run(
        *gpu_image,
        "import importlib.metadata as m, onnxruntime as o, pynvml\n"
        "print(m.version('onnxruntime-gpu'), o.get_available_providers())\n"
        "print('onnxruntime' in {d.metadata['Name'] for d in m.distributions()})",
    )
    assert "CUDAExecutionProvider" in output
    # Only the GPU wheel: the CPU one would shadow it (both install the onnxruntime module).
    assert output.strip().endswith("False")


def test_without_a_gpu_auto_models_serve_on_the_cpu_and_gpu_models_say_why(
    gpu_image: tuple[DockerEngine, str],
) -> None:
    output = _run(*gpu_image, SERVE_BOTH_KINDS)
    auto = [line for line in output.splitlines() if "'auto_model'" in line]
    gpu = [line for line in output.splitlines() if "'gpu_model'" in line]
    assert any("could not start CUDA" in line and "running on CPU" in line for line in auto)
    assert any("loaded model 'auto_model'" in line and "on CPU" in line for line in auto)
    assert any(
        "failed to load" in line and "could not start CUDA" in line and "fallback" in line
        for line in gpu
    )
    assert "server ready: 1 of 2 model versions ready" in output
