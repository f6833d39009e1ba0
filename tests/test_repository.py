"""Model repository loading: configs, auto-complete, version policies, failure isolation.

Each test builds a repository, starts a real server on it and looks through the
wire (RepositoryIndex, ModelConfig, ModelMetadata, ModelInfer).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models as models
from tests.conftest import serve


def index(client: grpcclient.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    return {
        (m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models
    }


def infer_scale(
    client: grpcclient.InferenceServerClient, model: str, x: np.ndarray, version: str = ""
) -> np.ndarray:
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], model_version=version).as_numpy("y")


def test_auto_complete_batchable_model(tmp_path: Path) -> None:
    models.save(models.scale(3.0, ["batch", 4]), tmp_path, "auto")
    with serve(tmp_path, default_max_batch_size=16) as server, server.client() as client:
        config = client.get_model_config("auto").config
        assert config.max_batch_size == 16
        assert config.HasField("dynamic_batching")
        assert [(i.name, list(i.dims)) for i in config.input] == [("x", [4])]
        assert [(o.name, list(o.dims)) for o in config.output] == [("y", [4])]
        assert [list(t.shape) for t in client.get_model_metadata("auto").inputs] == [[-1, 4]]
        x = np.ones((16, 4), np.float32)
        np.testing.assert_array_equal(infer_scale(client, "auto", x), 3 * x)


def test_auto_complete_fixed_first_dimension_means_no_batching(tmp_path: Path) -> None:
    models.save(models.scale(1.0, [3, 4]), tmp_path, "fixed")
    with serve(tmp_path) as server, server.client() as client:
        config = client.get_model_config("fixed").config
        assert config.max_batch_size == 0
        assert not config.HasField("dynamic_batching")
        assert list(config.input[0].dims) == [3, 4]


def test_explicit_max_batch_size_zero_is_respected(tmp_path: Path) -> None:
    models.save(
        models.scale(1.0, ["batch", 4]),
        tmp_path,
        "unbatched",
        config="max_batch_size: 0  # keep the batch dimension in dims\n",
    )
    with serve(tmp_path) as server, server.client() as client:
        config = client.get_model_config("unbatched").config
        assert config.max_batch_size == 0
        assert list(config.input[0].dims) == [-1, 4]
        x = np.ones((50, 4), np.float32)  # no max_batch_size limit applies
        np.testing.assert_array_equal(infer_scale(client, "unbatched", x), x)


def test_partial_config_is_completed(tmp_path: Path) -> None:
    models.save(
        models.add_sub(width=8),
        tmp_path,
        "partial",
        config=(
            'max_batch_size: 2\ninput [ { name: "INPUT0" } ]\n'
            "instance_group [ { count: 2 kind: KIND_CPU } ]\n"
        ),
    )
    with serve(tmp_path) as server, server.client() as client:
        config = client.get_model_config("partial").config
        assert config.max_batch_size == 2
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
            ("INPUT0", 11, [8]),
            ("INPUT1", 11, [8]),
        ]
        assert config.instance_group[0].count == 2
        assert config.instance_group[0].name == "partial_0"


TRITON_STYLE_CONFIG = """
name: "triton_style"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 format: FORMAT_NONE dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  default_queue_policy { max_queue_size: 16 timeout_action: REJECT }
}
instance_group [ { count: 1 kind: KIND_CPU } ]
optimization { graph { level: 1 } }
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
parameters { key: "execution_mode" value: { string_value: "0" } }
model_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]
response_cache { enable: false }
metric_tags { key: "team" value: "vision" }
a_field_from_a_newer_triton: "tolerated"
"""


def test_real_triton_config_loads_as_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    models.save(
        models.scale(2.0, ["batch", 4]), tmp_path, "triton_style", config=TRITON_STYLE_CONFIG
    )
    with caplog.at_level(logging.WARNING), serve(tmp_path) as server, server.client() as client:
        assert client.is_model_ready("triton_style")
        config = client.get_model_config("triton_style").config
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
        assert config.model_warmup[0].name == "w"
        x = np.ones((2, 4), np.float32)
        np.testing.assert_array_equal(infer_scale(client, "triton_style", x), 2 * x)
    assert any("a_field_from_a_newer_triton" in r.getMessage() for r in caplog.records)


FAILURES = {
    "syntax_error": ("max_batch_size: [oops\n", "config.pbtxt:"),
    "wrong_dtype": (
        'input [ { name: "x" data_type: TYPE_INT32 dims: [ 4 ] } ]\n',
        "input 'x' has data_type TYPE_INT32 but the model's is TYPE_FP32",
    ),
    "unknown_tensor": (
        'input [ { name: "pixels" data_type: TYPE_FP32 dims: [ 4 ] } ]\n',
        "input 'pixels' in config.pbtxt is not an input of the ONNX model",
    ),
    "wrong_dims": (
        'max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 5 ] } ]\n',
        "input 'x': dimension 1 is 5 in config.pbtxt but the model requires 4",
    ),
    "wrong_platform": ('platform: "tensorrt_plan"\n', "platform 'tensorrt_plan'"),
    "sequence": (
        "max_batch_size: 4\nsequence_batching { }\n",
        "sequence_batching is not supported",
    ),
    "name_mismatch": ('name: "other"\n', "config name 'other' does not match the model folder"),
    "batching_without_size": (
        "max_batch_size: 0\ndynamic_batching { }\n",
        "dynamic_batching needs max_batch_size > 0",
    ),
    "gpu_without_gpu": (
        "instance_group [ { kind: KIND_GPU } ]\n",
        "asks for KIND_GPU but onnxruntime offers only",
    ),
    "bad_parameter": (
        'parameters { key: "intra_op_thread_count" value: { string_value: "many" } }\n',
        "parameter 'intra_op_thread_count' is 'many'; expected an integer",
    ),
    "bad_graph_level": ("optimization { graph { level: 7 } }\n", "optimization.graph.level is 7"),
}


def test_failed_models_are_isolated_and_explained(tmp_path: Path) -> None:
    models.save(models.scale(2.0, ["batch", 4]), tmp_path, "good")
    for name, (config, _) in FAILURES.items():
        models.save(models.scale(1.0, ["batch", 4]), tmp_path, name, config=config)
    models.save(models.scale(1.0, [2, 4]), tmp_path, "fixed_batch", config="max_batch_size: 4\n")
    (tmp_path / "no_versions").mkdir()
    (tmp_path / "missing_file" / "1").mkdir(parents=True)
    (tmp_path / "truncated" / "1").mkdir(parents=True)
    full = models.scale(1.0, ["batch", 4]).SerializeToString()
    (tmp_path / "truncated" / "1" / "model.onnx").write_bytes(full[: len(full) // 2])
    with serve(tmp_path) as server, server.client() as client:
        entries = index(client)
        assert entries[("good", "1")] == ("READY", "")
        for name, (_, reason) in FAILURES.items():
            state, found = next(v for (n, _), v in entries.items() if n == name)
            assert state == "UNAVAILABLE", name
            assert reason in found, (name, found)
        assert "fixes it at 2" in entries[("fixed_batch", "1")][1]
        assert "no version folders" in entries[("no_versions", "")][1]
        assert "1/model.onnx was not found" in entries[("missing_file", "1")][1]
        assert "onnxruntime could not load model.onnx" in entries[("truncated", "1")][1]
        assert client.is_server_ready()  # not strict: the good model serves
        np.testing.assert_array_equal(
            infer_scale(client, "good", np.ones((1, 4), np.float32)), np.full((1, 4), 2.0)
        )


def test_strict_readiness(tmp_path: Path) -> None:
    models.save(models.scale(2.0, ["batch", 4]), tmp_path, "good")
    (tmp_path / "bad" / "1").mkdir(parents=True)
    with serve(tmp_path, strict_readiness=True) as server, server.client() as client:
        assert not client.is_server_ready()
        assert client.is_model_ready("good")


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("", ["4"]),
        ("version_policy { latest { num_versions: 2 } }", ["2", "4"]),
        ("version_policy { all { } }", ["1", "2", "4"]),
        ("version_policy { specific { versions: [ 1, 4, 9 ] } }", ["1", "4"]),
    ],
)
def test_version_policies(tmp_path: Path, policy: str, served: list[str]) -> None:
    for version in (1, 2, 4):
        models.save(models.scale(float(version), ["batch", 1]), tmp_path, "m", version)
    for ignored in ("0", "01", "latest", "3.5", "²", "١"):
        (tmp_path / "m" / ignored).mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text(policy)
    with serve(tmp_path) as server, server.client() as client:
        assert sorted(v for (n, v) in index(client) if n == "m") == served
        assert list(client.get_model_metadata("m").versions) == served
        for version in served:
            y = infer_scale(client, "m", np.ones((1, 1), np.float32), version)
            assert y.item() == float(version)


def test_default_model_filename_and_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "custom" / "1"
    folder.mkdir(parents=True)
    models.save(models.scale(5.0, ["batch", 2]), tmp_path, "tmp_source")
    (tmp_path / "tmp_source" / "1" / "model.onnx").rename(folder / "weights.onnx")
    (tmp_path / "custom" / "config.pbtxt").write_text('default_model_filename: "weights.onnx"\n')
    nested = tmp_path / "as_folder" / "1" / "model.onnx"
    nested.mkdir(parents=True)
    models.save(models.scale(6.0, ["batch", 2]), tmp_path, "tmp_source2")
    (tmp_path / "tmp_source2" / "1" / "model.onnx").rename(nested / "model.onnx")
    with serve(tmp_path) as server, server.client() as client:
        x = np.ones((1, 2), np.float32)
        assert infer_scale(client, "custom", x).tolist() == [[5.0, 5.0]]
        assert infer_scale(client, "as_folder", x).tolist() == [[6.0, 6.0]]


def test_reshape(tmp_path: Path) -> None:
    """Clients send [batch, 4]; the model takes [batch, 2, 2] (config `reshape`)."""
    models.save(
        models.scale(1.0, ["batch", 2, 2]),
        tmp_path,
        "reshaped",
        config=(
            "max_batch_size: 4\n"
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } } ]\n'
            'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } } ]\n'
        ),
    )
    with serve(tmp_path) as server, server.client() as client:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        np.testing.assert_array_equal(infer_scale(client, "reshaped", x), x)
        assert [list(t.shape) for t in client.get_model_metadata("reshaped").outputs] == [[-1, 4]]


def test_auto_complete_off_requires_config(tmp_path: Path) -> None:
    models.save(models.scale(1.0, ["batch", 4]), tmp_path, "bare")
    with serve(tmp_path, auto_complete_config=False) as server, server.client() as client:
        state, reason = index(client)[("bare", "")]
        assert (
            state == "UNAVAILABLE" and "config.pbtxt is missing and auto-complete is off" in reason
        )


def test_unknown_model_lists_available(tmp_path: Path) -> None:
    models.save(models.scale(1.0, ["batch", 4]), tmp_path, "only_one")
    with serve(tmp_path) as server, server.client() as client:
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_config("other")
        assert caught.value.status() == "StatusCode.NOT_FOUND"
        assert "this server has: only_one" in caught.value.message()


def test_vector_tensors_get_dims_1_with_reshape(tmp_path: Path) -> None:
    """A [batch] tensor auto-completes to dims [1] + reshape [], as in Triton."""
    models.save(models.vector_sum(), tmp_path, "vector")
    with serve(tmp_path) as server, server.client() as client:
        config = client.get_model_config("vector").config
        assert list(config.input[0].dims) == [1] and config.input[0].HasField("reshape")
        assert [list(t.shape) for t in client.get_model_metadata("vector").inputs] == [[-1, 1]]
        ids = grpcclient.InferInput("ids", [3, 1], "INT64")
        ids.set_data_from_numpy(np.array([[1], [2], [3]], dtype=np.int64))
        total = client.infer("vector", [ids]).as_numpy("total")
        assert total.tolist() == [[2], [3], [4]]


def test_max_batch_size_detection_ignores_strings_and_comments(tmp_path: Path) -> None:
    models.save(
        models.scale(1.0, ["batch", 4]),
        tmp_path,
        "in_string",
        config=('parameters { key: "note" value: { string_value: "max_batch_size: 64" } }\n'),
    )
    models.save(
        models.scale(1.0, ["batch", 4]),
        tmp_path,
        "hash_in_string",
        config=('parameters { key: "k#" value: { string_value: "v" } } max_batch_size: 0\n'),
    )
    with serve(tmp_path) as server, server.client() as client:
        assert client.get_model_config("in_string").config.max_batch_size == 4
        assert client.get_model_config("hash_in_string").config.max_batch_size == 0


def test_complete_config_without_auto_complete_needs_no_name_or_count(tmp_path: Path) -> None:
    models.save(
        models.scale(2.0, ["batch", 4]),
        tmp_path,
        "manual",
        config=(
            "max_batch_size: 2\n"
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
            'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
            "instance_group [ { kind: KIND_CPU } ]\n"
        ),
    )
    with serve(tmp_path, auto_complete_config=False) as server, server.client() as client:
        assert index(client)[("manual", "1")] == ("READY", "")
        config = client.get_model_config("manual").config
        assert config.name == "manual" and config.instance_group[0].count == 1
        np.testing.assert_array_equal(
            infer_scale(client, "manual", np.ones((2, 4), np.float32)), np.full((2, 4), 2.0)
        )


def test_load_errors_never_show_server_paths(tmp_path: Path) -> None:
    models.save(
        models.scale(1.0, ["batch", 4]),
        tmp_path,
        "bad_library",
        config='model_operations { op_library_filename: "libcustom.so" }\n',
    )
    (tmp_path / "bad_library" / "libcustom.so").write_bytes(b"not a shared library")
    models.save(
        models.scale(1.0, ["batch", 4]),
        tmp_path,
        "bad_reshape",
        config=(
            "max_batch_size: 2\n"
            'output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, -1 ] reshape: { shape: [ -1 ] } } ]\n'
        ),
    )
    with serve(tmp_path) as server, server.client() as client:
        entries = index(client)
        state, reason = entries[("bad_library", "1")]
        assert state == "UNAVAILABLE"
        assert "model_operations library 'libcustom.so' could not be loaded" in reason
        state, reason = entries[("bad_reshape", "1")]
        assert state == "UNAVAILABLE" and "dims may contain at most one -1" in reason
        for _, found in entries.values():
            assert str(tmp_path) not in found and str(tmp_path.resolve()) not in found


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (
            "max_batch_size: 4\ndynamic_batching { preferred_batch_size: [ 8 ] }\n",
            "preferred_batch_size 8 is outside 1 to max_batch_size 4",
        ),
        (
            "max_batch_size: 4\ndynamic_batching { priority_levels: 2 default_priority_level: 3 }\n",
            "default_priority_level is 3; expected 1 to 2",
        ),
        (
            "max_batch_size: 4\ndynamic_batching { priority_levels: 2 "
            "priority_queue_policy { key: 5 value: { max_queue_size: 1 } } }\n",
            "priority_queue_policy names level 5",
        ),
        (
            'max_batch_size: 4\nparameters { key: "padding" value: { string_value: "x" } }\n',
            "parameter 'padding' entry 'x': expected <input>:<value>",
        ),
        (
            'max_batch_size: 4\nparameters { key: "padding" value: { string_value: "x:zero" } }\n',
            "value 'zero' for input 'x' is not a number",
        ),
    ],
)
def test_batching_config_errors(tmp_path: Path, config: str, reason: str) -> None:
    models.save(models.scale(1.0, ["batch", "n"]), tmp_path, "m", config=config)
    with serve(tmp_path) as server, server.client() as client:
        state, found = index(client)[("m", "1")]
        assert state == "UNAVAILABLE" and reason in found, found


def test_padding_refused_when_outputs_could_not_be_cut_back(tmp_path: Path) -> None:
    models.save(
        models.untied_tokens(),
        tmp_path,
        "untied",
        config=(
            'max_batch_size: 4\nparameters { key: "padding" value: { string_value: "tokens:0" } }\n'
        ),
    )
    with serve(tmp_path) as server, server.client() as client:
        state, reason = index(client)[("untied", "1")]
        assert state == "UNAVAILABLE"
        assert "output 'copy' has a variable dimension 1" in reason and "seq" in reason


def test_text_input_refused_for_a_fixed_sequence_length(tmp_path: Path) -> None:
    from models import text_task

    model = models.identity(["INT64"])
    for tensor in (*model.graph.input, *model.graph.output):
        tensor.name = tensor.name.replace("IN_INT64", "input_ids").replace("OUT_INT64", "ids_out")
        tensor.type.tensor_type.shape.dim[1].dim_value = 16
    model.graph.node[0].input[0] = "input_ids"
    model.graph.node[0].output[0] = "ids_out"
    models.save(
        model,
        tmp_path,
        "fixed_text",
        config=(
            'max_batch_size: 4\nparameters { key: "text_input" value: { string_value: "TEXT" } }\n'
        ),
    )
    text_task.build_tokenizer(tmp_path / "fixed_text" / "tokenizer.json")
    with serve(tmp_path) as server, server.client() as client:
        state, reason = index(client)[("fixed_text", "1")]
        assert state == "UNAVAILABLE" and "dynamic sequence dimension" in reason, reason
