"""Health, metadata, configuration, index and statistics RPCs through tritonclient."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from tritonclient.utils import InferenceServerException

from tests.conftest import FrontendsServer, ServerThread


@pytest.fixture(scope="session")
def server(either_server: ServerThread | FrontendsServer) -> ServerThread | FrontendsServer:
    """Every test here runs against one process and against two front ends."""
    return either_server


def test_server_live_and_ready(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()


def test_model_ready(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_model_ready("add_sub")
    assert client.is_model_ready("add_sub", "1")
    assert not client.is_model_ready("add_sub", "2")
    assert not client.is_model_ready("broken")
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("add_sub", "not-a-number")


def test_server_metadata_lists_only_implemented_extensions(
    client: grpcclient.InferenceServerClient,
) -> None:
    metadata = client.get_server_metadata()
    assert metadata.name == "batchwise"
    assert metadata.version
    assert sorted(metadata.extensions) == ["model_configuration", "statistics"]


def test_model_metadata_has_leading_batch_dimension(
    client: grpcclient.InferenceServerClient,
) -> None:
    metadata = client.get_model_metadata("add_sub")
    assert metadata.name == "add_sub"
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "FP32", [-1, 16]),
        ("INPUT1", "FP32", [-1, 16]),
    ]
    assert [t.name for t in metadata.outputs] == ["OUTPUT0", "OUTPUT1"]


def test_model_metadata_of_non_batching_model(client: grpcclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("fixed_shape")
    assert [list(t.shape) for t in metadata.inputs] == [[2, 3]]


def test_model_metadata_lists_ready_versions(client: grpcclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("versioned")
    assert list(metadata.versions) == ["2", "3"]


def test_model_metadata_errors(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("no_such_model")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "unknown model 'no_such_model'" in unknown.value.message()
    with pytest.raises(InferenceServerException) as failed:
        client.get_model_metadata("broken")
    assert failed.value.status() == "StatusCode.UNAVAILABLE"
    assert "no ready version" in failed.value.message()
    assert "onnxruntime could not load" in failed.value.message()
    with pytest.raises(InferenceServerException) as version:
        client.get_model_metadata("versioned", "1")
    assert version.value.status() == "StatusCode.NOT_FOUND"
    assert "versions served: 2, 3" in version.value.message()


def test_model_config_is_completed(client: grpcclient.InferenceServerClient) -> None:
    """A model with no config.pbtxt gets one from its graph, as Triton's auto-complete does."""
    config = client.get_model_config("identity_bytes").config
    assert config.name == "identity_bytes"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("IN_BYTES", 13, [-1])  # TYPE_STRING
    ]
    assert config.instance_group[0].count == 1


def test_model_config_of_configured_model(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("add_sub").config
    assert config.max_batch_size == 8
    assert [list(i.dims) for i in config.input] == [[16], [16]]


def test_repository_index_reports_failed_model_with_reason(
    client: grpcclient.InferenceServerClient,
) -> None:
    index = client.get_model_repository_index()
    entries = {(m.name, m.version): m for m in index.models}
    assert entries[("add_sub", "1")].state == "READY"
    broken = entries[("broken", "1")]
    assert broken.state == "UNAVAILABLE"
    assert "onnxruntime could not load model.onnx" in broken.reason
    assert ("versioned", "1") not in entries  # latest 2 of 3
    assert {entries[("versioned", v)].state for v in ("2", "3")} == {"READY"}


def test_repository_index_ready_filter(stub: object) -> None:
    from tritonclient.grpc import service_pb2

    index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))  # type: ignore[attr-defined]
    names = {m.name for m in index.models}
    assert "broken" not in names
    assert {"add_sub", "versioned", "identity_bytes"} <= names


def _infer_add_sub(client: grpcclient.InferenceServerClient, rows: int) -> None:
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = grpcclient.InferInput(name, [rows, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((rows, 16), dtype=np.float32))
        inputs.append(tensor)
    client.infer("add_sub", inputs)


def test_statistics_count_requests_rows_and_executions(server: ServerThread) -> None:
    """Counts follow Triton: rows in inference_count, session runs in execution_count."""
    with server.client() as client:
        before = client.get_inference_statistics("add_sub").model_stats[0]
        for rows in (1, 3, 2):
            _infer_add_sub(client, rows)
        with pytest.raises(InferenceServerException):
            client.infer("add_sub", [grpcclient.InferInput("INPUT0", [1, 16], "FP32")])
        after = client.get_inference_statistics("add_sub").model_stats[0]
    assert after.name == "add_sub" and after.version == "1"
    assert after.inference_count - before.inference_count == 6
    assert after.execution_count - before.execution_count == 3
    success = after.inference_stats.success
    assert success.count - before.inference_stats.success.count == 3
    assert success.ns > before.inference_stats.success.ns
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        stat = getattr(after.inference_stats, part)
        assert stat.count - getattr(before.inference_stats, part).count == 3
    # compute time is part of the request time
    assert after.inference_stats.compute_infer.ns < success.ns
    batch_sizes = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    assert {1, 2, 3} <= set(batch_sizes)
    assert after.last_inference > 0


def test_statistics_for_all_models_and_errors(client: grpcclient.InferenceServerClient) -> None:
    everything = client.get_inference_statistics()
    names = {(s.name, s.version) for s in everything.model_stats}
    assert {("add_sub", "1"), ("versioned", "2"), ("versioned", "3")} <= names
    assert not any(name == "broken" for name, _ in names)
    versions = client.get_inference_statistics("versioned")
    assert [s.version for s in versions.model_stats] == ["2", "3"]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_inference_statistics("no_such_model")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as bad_version:
        client.get_inference_statistics("add_sub", "x")
    assert bad_version.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_grpc_health_overall_and_per_model(server: ServerThread) -> None:
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
        assert (
            health.Check(
                health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
            ).status
            == serving
        )
        assert health.Check(health_pb2.HealthCheckRequest(service="add_sub")).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service="broken")).status == not_serving
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no_such_model"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
def test_reflection_lists_and_describes_services(
    server: ServerThread | FrontendsServer, version: str
) -> None:
    """What grpcurl (v1alpha) and newer clients such as grpc-js's (v1) do: list services,
    then fetch the file that defines one. The two versions' messages are the same."""
    with grpc.insecure_channel(server.url) as channel:
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="inference.GRPCInferenceService"
            ),
            reflection_pb2.ServerReflectionRequest(file_by_filename="model_config.proto"),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol=f"grpc.reflection.{version}.ServerReflection"
            ),
        ]
        listing, service_file, config_file, own_file = list(info(iter(requests)))
    names = {s.name for s in listing.list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    } <= names
    own = descriptor_pb2.FileDescriptorProto.FromString(
        own_file.file_descriptor_response.file_descriptor_proto[0]
    )
    assert own.package == f"grpc.reflection.{version}"
    proto = descriptor_pb2.FileDescriptorProto.FromString(
        service_file.file_descriptor_response.file_descriptor_proto[0]
    )
    assert proto.package == "inference"
    assert "ModelInfer" in {m.name for m in proto.service[0].method}
    config_proto = descriptor_pb2.FileDescriptorProto.FromString(
        config_file.file_descriptor_response.file_descriptor_proto[0]
    )
    assert "ModelConfig" in {m.name for m in config_proto.message_type}
