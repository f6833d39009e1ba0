"""The server's protocol is wire-compatible with Triton's, message by message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from service.protocol import grpc_service_pb2 as ours_service
from service.protocol import model_config_pb2 as ours_config

ROOT = Path(__file__).resolve().parent.parent


def _field_facts(field: descriptor.FieldDescriptor) -> tuple[object, ...]:
    referenced = field.message_type or field.enum_type
    return (
        field.number,
        field.type,
        field.is_repeated,
        referenced.full_name if referenced else None,
        field.containing_oneof.name if field.containing_oneof else None,
    )


def _messages(
    scope: descriptor.FileDescriptor | descriptor.Descriptor,
) -> dict[str, descriptor.Descriptor]:
    found: dict[str, descriptor.Descriptor] = {}
    children = (
        scope.message_types_by_name.values()
        if isinstance(scope, descriptor.FileDescriptor)
        else scope.nested_types
    )
    for message in children:
        found[message.full_name] = message
        found.update(_messages(message))
    return found


def _enums(file: descriptor.FileDescriptor) -> dict[str, descriptor.EnumDescriptor]:
    found = {e.full_name: e for e in file.enum_types_by_name.values()}
    for message in _messages(file).values():
        found.update({e.full_name: e for e in message.enum_types})
    return found


PAIRS = [
    pytest.param(ours_config.DESCRIPTOR, triton_config.DESCRIPTOR, id="model_config"),
    pytest.param(ours_service.DESCRIPTOR, triton_service.DESCRIPTOR, id="grpc_service"),
]


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_every_message_matches_field_by_field(
    ours: descriptor.FileDescriptor, theirs: descriptor.FileDescriptor
) -> None:
    our_messages, their_messages = _messages(ours), _messages(theirs)
    assert ours.package == theirs.package == "inference"
    assert sorted(our_messages) == sorted(their_messages)
    for name, message in their_messages.items():
        mine = our_messages[name]
        assert {f.name: _field_facts(f) for f in mine.fields} == {
            f.name: _field_facts(f) for f in message.fields
        }, name
        assert mine.GetOptions().map_entry == message.GetOptions().map_entry, name


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_every_enum_matches_value_by_value(
    ours: descriptor.FileDescriptor, theirs: descriptor.FileDescriptor
) -> None:
    our_enums, their_enums = _enums(ours), _enums(theirs)
    assert sorted(our_enums) == sorted(their_enums)
    for name, enum in their_enums.items():
        assert {v.name: v.number for v in our_enums[name].values} == {
            v.name: v.number for v in enum.values
        }, name


def test_service_methods_match() -> None:
    mine = ours_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert mine.full_name == theirs.full_name == "inference.GRPCInferenceService"

    def facts(service: descriptor.ServiceDescriptor) -> dict[str, tuple[object, ...]]:
        return {
            m.name: (
                m.input_type.full_name,
                m.output_type.full_name,
                m.client_streaming,
                m.server_streaming,
            )
            for m in service.methods
        }

    assert facts(mine) == facts(theirs)


def test_messages_round_trip_between_the_two_copies() -> None:
    """Bytes from tritonclient's classes parse into ours identically, and back."""
    request = triton_service.ModelInferRequest(model_name="m", model_version="2", id="abc")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    tensor.parameters["p"].uint64_param = 7
    request.parameters["priority"].uint64_param = 2
    request.raw_input_contents.append(b"\x00" * 12)
    ours = ours_service.ModelInferRequest.FromString(request.SerializeToString())
    assert ours.inputs[0].parameters["p"].uint64_param == 7
    assert triton_service.ModelInferRequest.FromString(ours.SerializeToString()) == request


def test_generated_code_is_current() -> None:
    """Regenerating service/protocol from proto/ changes nothing."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_protocol.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_private_pool_keeps_both_copies_importable() -> None:
    """tritonclient's descriptors and ours live side by side in one process."""
    assert ours_service.DESCRIPTOR.pool is not triton_service.DESCRIPTOR.pool
    assert ours_service.ModelInferRequest is not triton_service.ModelInferRequest
