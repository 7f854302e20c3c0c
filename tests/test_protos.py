"""The committed stubs in qlm/v1/ match protos/qlm/v1/*.proto, and the public API keeps the wire
contract that other tools (grpcurl scripts, clients in other languages) rely on."""

from __future__ import annotations

import difflib
import importlib.util
import pathlib

import pytest
from google.protobuf.descriptor import FieldDescriptor

from qlm import codegen
from qlm.v1 import router_pb2

COMMITTED = codegen.ROOT / "qlm" / "v1"
REGENERATE = "run `.venv/bin/python -m qlm.codegen` and commit the result"


def _diff(committed: pathlib.Path, generated: pathlib.Path) -> str:
    lines = difflib.unified_diff(
        committed.read_text(errors="replace").splitlines(),
        generated.read_text(errors="replace").splitlines(),
        f"committed/{committed.name}", f"generated/{generated.name}", lineterm="", n=1,
    )
    return "\n".join(list(lines)[:40])


def test_committed_stubs_match_protos(tmp_path):
    if importlib.util.find_spec("grpc_tools") is None:  # not imported: see qlm.codegen
        pytest.skip("grpcio-tools (the test extra) is not installed")
    generated = {p.name: p for p in codegen.generate(tmp_path)}
    committed = {p.name: p for p in COMMITTED.glob("*_pb2*.py*")}
    assert generated, "qlm.codegen.generate wrote no stubs"

    missing = sorted(generated.keys() - committed.keys())
    extra = sorted(committed.keys() - generated.keys())
    assert not missing, f"stubs missing from qlm/v1/: {missing}; {REGENERATE}"
    assert not extra, (f"qlm/v1/ has stubs no .proto generates: {extra}; delete them, then "
                       f"{REGENERATE}")

    stale = [name for name in sorted(generated)
             if generated[name].read_bytes() != committed[name].read_bytes()]
    assert not stale, (
        f"qlm/v1/ stubs are out of date with protos/qlm/v1/*.proto: {stale}; {REGENERATE} "
        "(they must be protoc's exact output: keep formatters and `ruff --fix` off them)\n"
        + _diff(committed[stale[0]], generated[stale[0]])
    )


def test_generate_request_wire_contract():
    fields = router_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
    expected = {
        "model": FieldDescriptor.TYPE_STRING,
        "prompt": FieldDescriptor.TYPE_STRING,
        "max_tokens": FieldDescriptor.TYPE_UINT32,
        "slo_class": FieldDescriptor.TYPE_STRING,
    }
    for name, type_ in expected.items():
        assert name in fields, f"GenerateRequest lost its top-level field {name!r}"
        field = fields[name]
        assert field.containing_oneof is None, f"GenerateRequest.{name} moved into a oneof"
        assert field.type == type_, f"GenerateRequest.{name} changed type"
        assert not _is_repeated(field), f"GenerateRequest.{name} became repeated"


def _is_repeated(field: FieldDescriptor) -> bool:
    # `label` is deprecated in newer protobuf releases in favour of `is_repeated`.
    is_repeated = getattr(field, "is_repeated", None)
    if is_repeated is not None:
        return is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def test_router_service_methods():
    service = router_pb2.DESCRIPTOR.services_by_name["Router"]
    assert service.full_name == "qlm.v1.Router"
    # name -> (client streaming, server streaming)
    expected = {
        "Generate": (False, True),
        "Submit": (False, False),
        "Watch": (False, True),
        "Cancel": (False, False),
        "GetRequest": (False, False),
        "ListModels": (False, False),
    }
    methods = service.methods_by_name
    for name, (client_streaming, server_streaming) in expected.items():
        assert name in methods, f"Router lost its {name} method"
        m = methods[name]
        assert (m.client_streaming, m.server_streaming) == (client_streaming, server_streaming), (
            f"Router.{name}: client_streaming={m.client_streaming}, "
            f"server_streaming={m.server_streaming}; expected {client_streaming}, "
            f"{server_streaming}")
    assert methods["Generate"].input_type.full_name == "qlm.v1.GenerateRequest"
    assert methods["Submit"].input_type.full_name == "qlm.v1.GenerateRequest"
