"""Placement, provider options, GPU fallback and warm-up: what can be checked without a GPU.

The planning rules run as they do in the server (service.placement, pure
functions of the config and of what the machine offers); the behaviour on
this machine (onnxruntime without CUDA) runs through a real server and
tritonclient. tests/test_gpu.py covers the same on a real GPU.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.utils import InferenceServerException

from service.errors import ModelLoadError
from service.gpu import visible_gpu_count
from service.model_config import ModelConfigError
from service.placement import (
    CPU,
    CUDA,
    TENSORRT,
    GpuDefaults,
    Placement,
    automatic_profiles,
    plan_placement,
)
from service.protocol import model_config_pb2 as mc
from service.runtime import available_providers
from service.warmup import batch_sizes
from tests import onnx_models as models
from tests.conftest import serve

CPU_ONLY = [CPU]
WITH_CUDA = [TENSORRT, CUDA, CPU]


def config(text: str) -> mc.ModelConfig:
    parsed = mc.ModelConfig()
    text_format.Parse(text, parsed)
    return parsed


def plan(
    text: str, available: list[str] = WITH_CUDA, gpus: int | None = 1, **defaults: Any
) -> Placement:
    """Plan as the server would on a machine offering `available` and `gpus` GPUs."""
    return plan_placement(
        config(text), available, gpus, GpuDefaults(**defaults), True, Path("/models/m")
    )


GPU_GROUP = "instance_group [ { kind: KIND_GPU } ]"
TENSORRT_BLOCK = (
    'optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" '
    "%s } ] } }"
)


def trt(parameters: str, head: str = GPU_GROUP) -> str:
    return head + "\n" + TENSORRT_BLOCK % parameters


# ------------------------------------------------------------- planning ---


def test_auto_kind_may_always_fall_back_to_the_cpu_gpu_kind_only_when_allowed() -> None:
    # CUDA installed, GPU count unknown (no NVML): AUTO tries the GPU but may end on the CPU.
    auto = plan("instance_group [ { kind: KIND_AUTO } ]", gpus=None)
    assert auto.on_gpu and auto.cpu_fallback
    assert not plan(GPU_GROUP, gpus=None).cpu_fallback
    assert plan(GPU_GROUP, gpus=None, fallback_to_cpu=True).cpu_fallback


def test_cpu_kind_runs_on_cpu_with_its_count_even_where_cuda_exists() -> None:
    placement = plan("instance_group [ { kind: KIND_CPU count: 3 } ]")
    assert [d.label for d in placement.devices] == ["CPU"]
    assert placement.devices[0].providers == ((CPU, {}),)
    assert placement.instance_count == 3 and not placement.on_gpu


def test_gpu_kind_builds_a_cuda_chain_with_serving_defaults() -> None:
    placement = plan("instance_group [ { kind: KIND_GPU count: 2 gpus: [ 1 ] } ]", gpus=2)
    (device,) = placement.devices
    assert device.label == "GPU 1" and device.gpu == 1
    names = [name for name, _ in device.providers]
    assert names == [CUDA, CPU]
    cuda = device.providers[0][1]
    assert cuda["device_id"] == "1"
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cuda["arena_extend_strategy"] == "kSameAsRequested"
    assert "gpu_mem_limit" not in cuda
    assert cuda["use_tf32"] == "0"  # served FP32 results match the CPU unless a model opts in
    assert placement.instance_count == 2 and placement.on_gpu


def test_without_gpus_listed_count_instances_go_on_every_visible_gpu() -> None:
    placement = plan("instance_group [ { kind: KIND_GPU count: 2 } ]", gpus=3)
    assert [d.label for d in placement.devices] == ["GPU 0", "GPU 1", "GPU 2"]
    assert placement.instances_per_device == 2 and placement.instance_count == 6


def test_server_settings_reach_the_cuda_options_and_models_override_them() -> None:
    defaults = {
        "conv_algo_search": "EXHAUSTIVE",
        "memory_limit_bytes": 2**30,
        "arena_extend_strategy": "kNextPowerOfTwo",
    }
    cuda = plan(GPU_GROUP, **defaults).devices[0].providers[0][1]
    assert cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert cuda["gpu_mem_limit"] == str(2**30)
    assert cuda["arena_extend_strategy"] == "kNextPowerOfTwo"
    overridden = plan(
        GPU_GROUP + "\noptimization { execution_accelerators { gpu_execution_accelerator [ "
        '{ name: "cuda" parameters { key: "cudnn_conv_algo_search" value: "heuristic" } '
        'parameters { key: "gpu_mem_limit" value: "1000000" } '
        'parameters { key: "use_tf32" value: "false" } } ] } }',
        **defaults,
    )
    cuda = overridden.devices[0].providers[0][1]
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cuda["gpu_mem_limit"] == "1000000"
    assert cuda["use_tf32"] == "0"


@pytest.mark.parametrize(
    ("parameter", "message"),
    [
        ('key: "cudnn_conv_algo_search" value: "FASTEST"', "expected one of HEURISTIC"),
        ('key: "gpu_mem_limit" value: "lots"', "expected an integer"),
        ('key: "gpu_mem_limit" value: "0"', "≥ 1"),
        ('key: "arena_extend_strategy" value: "kGrow"', "kSameAsRequested"),
        ('key: "use_tf32" value: "maybe"', "0/1 or true/false"),
        ('key: "enable_cuda_graph" value: "1"', "CUDA graphs"),
        ('key: "cuda_colour" value: "1"', "is not known"),
    ],
)
def test_bad_cuda_parameters_name_the_parameter_even_on_a_cpu_machine(
    parameter: str, message: str
) -> None:
    text = (
        "instance_group [ { kind: KIND_CPU } ]\noptimization { execution_accelerators { "
        f'gpu_execution_accelerator [ {{ name: "cuda" parameters {{ {parameter} }} }} ] }} }}'
    )
    with pytest.raises(ModelConfigError, match=re.escape(message)) as caught:
        plan(text, available=CPU_ONLY, gpus=None)
    assert "cuda accelerator parameter" in str(caught.value)


def test_gpu_requested_without_cuda_fails_naming_the_providers_and_the_fallback() -> None:
    with pytest.raises(ModelLoadError) as caught:
        plan(GPU_GROUP, available=CPU_ONLY, gpus=None)
    message = str(caught.value)
    assert "KIND_GPU" in message and "[CPUExecutionProvider]" in message
    assert "--gpu-fallback-to-cpu" in message and "KIND_CPU" in message


def test_gpu_requested_with_cuda_installed_but_no_device_fails_clearly() -> None:
    with pytest.raises(ModelLoadError, match="no GPU is visible"):
        plan(GPU_GROUP, gpus=0)


def test_fallback_setting_runs_a_gpu_request_on_cpu_and_says_why() -> None:
    placement = plan(GPU_GROUP, available=CPU_ONLY, gpus=None, fallback_to_cpu=True)
    assert [d.label for d in placement.devices] == ["CPU"]
    assert len(placement.notes) == 1 and "--gpu-fallback-to-cpu" in placement.notes[0]


def test_auto_kind_takes_the_gpu_only_where_there_is_one() -> None:
    assert plan("", available=CPU_ONLY, gpus=None).devices[0].label == "CPU"
    assert plan("", gpus=0).devices[0].label == "CPU"
    assert plan("", gpus=1).devices[0].label == "GPU 0"


def test_a_gpu_that_is_not_there_is_refused() -> None:
    with pytest.raises(ModelLoadError, match=re.escape("asks for GPU 3 but 2 GPU(s) are visible")):
        plan("instance_group [ { kind: KIND_GPU gpus: [ 0, 3 ] } ]", gpus=2)


def test_visible_gpu_count_follows_cuda_visible_devices() -> None:
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": "-1"}) == 0
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": "0,2"}) == 2
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == 1


# ------------------------------------------------------------- TensorRT ---


def test_tensorrt_in_triton_syntax_becomes_provider_options_with_cuda_behind() -> None:
    placement = plan(
        trt(
            'parameters { key: "precision_mode" value: "FP16" } '
            'parameters { key: "max_workspace_size_bytes" value: "1073741824" } '
            'parameters { key: "trt_engine_cache_enable" value: "true" } '
            'parameters { key: "trt_engine_cache_path" value: "trt-cache" } '
            'parameters { key: "trt_profile_min_shapes" value: "x:1x3" } '
            'parameters { key: "trt_profile_opt_shapes" value: "x:8x3" } '
            'parameters { key: "trt_profile_max_shapes" value: "x:16x3" }'
        )
    )
    names = [name for name, _ in placement.devices[0].providers]
    assert names == [TENSORRT, CUDA, CPU]
    options = placement.devices[0].providers[0][1]
    assert options["trt_fp16_enable"] == "1" and options["trt_int8_enable"] == "0"
    assert options["trt_max_workspace_size"] == "1073741824"
    assert options["trt_engine_cache_enable"] == "1"
    assert options["trt_engine_cache_path"] == "/models/m/trt-cache"
    assert options["trt_profile_opt_shapes"] == "x:8x3"
    assert not placement.notes


def test_tensorrt_without_its_libraries_runs_on_cuda_and_says_so() -> None:
    config_text = trt('parameters { key: "precision_mode" value: "FP32" }')
    placement = plan_placement(
        config(config_text), WITH_CUDA, 1, GpuDefaults(), False, Path("/models/m")
    )
    assert [name for name, _ in placement.devices[0].providers] == [CUDA, CPU]
    assert "libnvinfer" in placement.notes[0] and "running on CUDA" in placement.notes[0]
    placement = plan(config_text, available=[CUDA, CPU])
    assert "no TensorRT provider" in placement.notes[0]


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ('parameters { key: "precision_mode" value: "FP8" }', "expected one of FP32, FP16, INT8"),
        (
            'parameters { key: "trt_engine_cache_enable" value: "1" }',
            "needs 'trt_engine_cache_path'",
        ),
        ('parameters { key: "trt_profile_min_shapes" value: "x:1x3" }', "or none"),
        ('parameters { key: "trt_profile_min_shapes" value: "x=1,3" }', "'<input>:<dim>x<dim>"),
        ('parameters { key: "trt_min_subgraph_size" value: "-2" }', "≥ 0"),
        ('parameters { key: "trt_turbo" value: "1" }', "is not known"),
    ],
)
def test_bad_tensorrt_parameters_name_the_parameter(parameters: str, message: str) -> None:
    with pytest.raises(ModelConfigError, match=re.escape(message)):
        plan(trt(parameters), available=CPU_ONLY, gpus=None)


def test_unknown_accelerators_are_refused() -> None:
    text = (
        GPU_GROUP + "\noptimization { execution_accelerators { gpu_execution_accelerator [ "
        '{ name: "openvino" } ] } }'
    )
    with pytest.raises(ModelConfigError, match="expected 'tensorrt' or 'cuda'"):
        plan(text)


def test_automatic_tensorrt_profiles_cover_what_the_batcher_forms() -> None:
    text = (
        "max_batch_size: 16\n"
        'input [ { name: "ids" data_type: TYPE_INT64 dims: [ -1 ] },'
        ' { name: "mask" data_type: TYPE_INT64 dims: [ -1 ] } ]\n'
        "dynamic_batching { preferred_batch_size: [ 8 ] }\n"
        'parameters { key: "max_sequence_length" value: { string_value: "128" } }'
    )
    assert automatic_profiles(config(text)) == {
        "trt_profile_min_shapes": "ids:1x1,mask:1x1",
        "trt_profile_opt_shapes": "ids:8x128,mask:8x128",
        "trt_profile_max_shapes": "ids:16x128,mask:16x128",
    }
    options = plan(trt("", head=GPU_GROUP + "\n" + text)).devices[0].providers[0][1]
    assert options["trt_profile_max_shapes"] == "ids:16x128,mask:16x128"
    # Without a known longest sequence no profile can be guessed; fixed shapes need none.
    assert automatic_profiles(config(text.replace("128", "many"))) == {}
    fixed = 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]'
    assert automatic_profiles(config(fixed)) == {}


# ------------------------------------------------- through a real server ---


def _repository(root: Path, head: str) -> Path:
    models.save(
        models.scale(2.0, ["batch", 4]),
        root,
        "doubler",
        config=(
            f'name: "doubler"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
            'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
            f"dynamic_batching {{ }}\n{head}\n"
        ),
    )
    return root


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _double(client: grpcclient.InferenceServerClient) -> np.ndarray:
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = grpcclient.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("doubler", [tensor]).as_numpy("y")
    assert result is not None
    np.testing.assert_allclose(result, data * 2)
    return result


@pytest.mark.skipif(CUDA in available_providers(), reason="this machine has CUDA")
def test_gpu_model_on_a_cpu_machine_fails_its_load_and_says_why(tmp_path: Path) -> None:
    repository = _repository(tmp_path, GPU_GROUP)
    with serve(repository) as server, server.client() as client:
        assert not client.is_model_ready("doubler")
        (entry,) = client.get_model_repository_index(as_json=True)["models"]
        assert entry["state"] == "UNAVAILABLE"
        assert "KIND_GPU" in entry["reason"] and "CPUExecutionProvider" in entry["reason"]
        assert "--gpu-fallback-to-cpu" in entry["reason"]
        with pytest.raises(InferenceServerException) as caught:
            _double(client)
        assert caught.value.status() == "StatusCode.UNAVAILABLE"


@pytest.mark.skipif(CUDA in available_providers(), reason="this machine has CUDA")
def test_fallback_serves_a_gpu_model_on_cpu_and_reports_the_provider(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = _repository(tmp_path, GPU_GROUP)
    with (
        caplog.at_level("WARNING", logger="service.repository"),
        serve(repository, gpu_fallback_to_cpu=True) as server,
        server.client() as client,
    ):
        _double(client)
        served = client.get_model_config("doubler", as_json=True)["config"]
        assert served["instance_group"][0]["kind"] == "KIND_CPU"
        parameters = served["parameters"]
        assert parameters["execution_provider"]["string_value"] == CPU
        assert parameters["execution_devices"]["string_value"] == "CPU"
        text = _metrics(server.server.metrics_port)
    assert (
        'batchwise_model_execution_info{device="CPU",model="doubler",'
        'provider="CPUExecutionProvider",version="1"} 1.0' in text
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("--gpu-fallback-to-cpu" in w and "doubler" in w for w in warnings)


@pytest.mark.skipif(CUDA in available_providers(), reason="this machine has CUDA")
@pytest.mark.skipif(visible_gpu_count() is not None, reason="NVML or CUDA_VISIBLE_DEVICES here")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
@pytest.mark.parametrize(
    "head", ["instance_group [ { kind: KIND_AUTO } ]", ""], ids=["auto", "none"]
)
def test_gpu_image_without_a_gpu_loads_auto_models_on_the_cpu(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    head: str,
) -> None:
    """onnxruntime-gpu lists CUDA even where there is no driver (a GPU image on a CPU node):
    a model that leaves the kind to the server tries CUDA, which does not start, and must
    then serve on the CPU rather than fail its load."""
    monkeypatch.setattr("service.repository.available_providers", lambda: [CUDA, CPU])
    repository = _repository(tmp_path, head)
    with (
        caplog.at_level("WARNING", logger="service.repository"),
        serve(repository) as server,
        server.client() as client,
    ):
        _double(client)
        served = client.get_model_config("doubler", as_json=True)["config"]
        assert served["instance_group"][0]["kind"] == "KIND_CPU"
        assert served["parameters"]["execution_provider"]["string_value"] == CPU
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("could not start CUDA" in w and "running on CPU" in w for w in warnings)


@pytest.mark.skipif(CUDA in available_providers(), reason="this machine has CUDA")
@pytest.mark.skipif(visible_gpu_count() is not None, reason="NVML or CUDA_VISIBLE_DEVICES here")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_gpu_image_without_a_gpu_still_fails_a_kind_gpu_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.repository.available_providers", lambda: [CUDA, CPU])
    repository = _repository(tmp_path, GPU_GROUP)
    with serve(repository) as server, server.client() as client:
        assert not client.is_model_ready("doubler")
        (entry,) = client.get_model_repository_index(as_json=True)["models"]
        assert "could not start CUDA" in entry["reason"]
        assert "--gpu-fallback-to-cpu" in entry["reason"]


def test_warmup_runs_every_batch_size_the_batcher_can_form(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = _repository(tmp_path, "instance_group [ { kind: KIND_CPU } ]")
    with (
        caplog.at_level("INFO", logger="service.repository"),
        serve(repository, warmup="all") as server,
        server.client() as client,
    ):
        _double(client)
        text = _metrics(server.server.metrics_port)
        version = server.server.registry.resolve("doubler", "")
        assert version.warmup is not None
        assert [rows for rows, _ in version.warmup.shapes] == [8, 7, 6, 5, 4, 3, 2, 1]
        assert version.warmup.failure is None
    match = re.search(
        r'batchwise_model_warmup_duration_seconds\{model="doubler",version="1"\} (\S+)', text
    )
    assert match is not None and float(match.group(1)) > 0
    assert any("warm-up 8 shapes, 8 runs" in r.getMessage() for r in caplog.records)


def test_warmup_plan_takes_every_batch_size_on_a_gpu_and_samples_on_the_cpu() -> None:
    config = mc.ModelConfig(max_batch_size=100)
    config.dynamic_batching.preferred_batch_size.append(48)
    assert batch_sizes(config, every_size=True) == list(range(100, 0, -1))
    sampled = batch_sizes(config)
    assert sampled == [100, 64, 48, *range(32, 0, -1)]
    assert batch_sizes(mc.ModelConfig(max_batch_size=0), every_size=True) == [None]


def test_warmup_runs_on_every_instance_thread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Per-thread provider state is created by warm-up, not by a client's first batch."""
    repository = _repository(tmp_path, "instance_group [ { kind: KIND_CPU count: 3 } ]")
    with (
        caplog.at_level("DEBUG", logger="service.warmup"),
        serve(repository, warmup="all") as server,
        server.client() as client,
    ):
        assert _double(client) is not None
        report = server.server.registry.resolve("doubler", "").warmup
    assert report is not None and report.failure is None
    # Every instance thread runs all eight batch sizes itself.
    assert report.runs == 3 * 8
    found = [re.search(r"thread \[(.+)\]: (\d+) shapes", r.getMessage()) for r in caplog.records]
    threads = sorted(match.groups() for match in found if match is not None)
    assert [name for name, _ in threads] == [f"model 'doubler' version 1 #{i}" for i in range(3)]
    assert [int(count) for _, count in threads] == [8, 8, 8]


def test_work_for_every_instance_runs_once_per_thread_and_reports_failures(
    tmp_path: Path,
) -> None:
    repository = _repository(tmp_path, "instance_group [ { kind: KIND_CPU count: 2 } ]")
    with serve(repository) as server:
        scheduler = server.server.registry.resolve("doubler", "").scheduler
        names = scheduler.on_every_instance(lambda: threading.current_thread().name)
        assert sorted(names) == ["model 'doubler' version 1 #0", "model 'doubler' version 1 #1"]

        def fails() -> None:
            raise ValueError("no")

        outcomes = scheduler.on_every_instance(fails)
        assert [type(o) for o in outcomes] == [ValueError, ValueError]
        with server.client() as client:  # the instances still serve afterwards
            _double(client)
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.on_every_instance(lambda: None)


def test_warmup_is_off_on_cpu_by_default_and_a_model_parameter_turns_it_on(
    tmp_path: Path,
) -> None:
    first = _repository(tmp_path / "a", "instance_group [ { kind: KIND_CPU } ]")
    with serve(first) as server:
        assert server.server.registry.resolve("doubler", "").warmup is None
        assert "batchwise_model_warmup_duration_seconds{" not in _metrics(
            server.server.metrics_port
        )
    second = _repository(
        tmp_path / "b",
        "instance_group [ { kind: KIND_CPU } ]\n"
        'parameters { key: "warmup" value: { string_value: "true" } }',
    )
    with serve(second) as server:
        report = server.server.registry.resolve("doubler", "").warmup
        assert report is not None and report.runs == 8


def test_warmup_of_sequence_models_covers_length_buckets(tmp_path: Path) -> None:
    models.save(
        models.tied_add(),
        tmp_path,
        "tokens",
        config=(
            'name: "tokens"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 2\n'
            'parameters { key: "max_sequence_length" value: { string_value: "20" } }\n'
            'parameters { key: "warmup" value: { string_value: "on" } }\n'
        ),
    )
    with serve(tmp_path) as server:
        report = server.server.registry.resolve("tokens", "").warmup
        assert report is not None and report.failure is None
        assert report.shapes == ((2, 20), (2, 16), (2, 8), (1, 20), (1, 16), (1, 8))


def test_bad_gpu_parameters_fail_the_load_on_a_cpu_machine_with_the_reason(
    tmp_path: Path,
) -> None:
    repository = _repository(
        tmp_path,
        trt(
            'parameters { key: "precision_mode" value: "FP64" }',
            head="instance_group [ { kind: KIND_CPU } ]",
        ),
    )
    with serve(repository) as server, server.client() as client:
        (entry,) = client.get_model_repository_index(as_json=True)["models"]
        assert "precision_mode" in entry["reason"] and "FP64" in entry["reason"]
