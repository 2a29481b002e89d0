"""authz/proto is wire-identical to Envoy's protos, and its generated modules are current.

The reference is the real xds-protos wheel (Envoy's protos compiled), which scripts/test
downloads to ``.venv/reference`` and never installs: its files would overwrite
opentelemetry-proto's. Each ``*_pb2.py`` carries its file's serialized descriptor, read
here from the wheel's source text without importing it (importing both would clash in
protobuf's descriptor pool: same message names).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "authz" / "proto"
REFERENCE = Path(sys.prefix) / "reference"  # where scripts/test puts the xds-protos wheel

# Our file -> Envoy's, by module path.
ENVOY_FILES = {
    "base": "envoy/config/core/v3/base",
    "http_status": "envoy/type/v3/http_status",
    "attribute_context": "envoy/service/auth/v3/attribute_context",
    "external_auth": "envoy/service/auth/v3/external_auth",
    "processing_mode": "envoy/extensions/filters/http/ext_proc/v3/processing_mode",
    "external_processor": "envoy/service/ext_proc/v3/external_processor",
}
# Envoy's fields left out on purpose (the .proto file says why); any other field of a
# message we declare must be declared too, so an Envoy addition gets looked at.
OMITTED = {"envoy.service.auth.v3.AttributeContext.Peer.address"}

Fdp = descriptor_pb2.FileDescriptorProto


def serialized_file(source: str) -> Fdp:
    """The FileDescriptorProto a generated ``*_pb2.py`` registers, from its text."""
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
        ):
            return Fdp.FromString(ast.literal_eval(node.args[0]))
    raise AssertionError("no AddSerializedFile(...) call: not a generated _pb2 module")


@pytest.fixture(scope="module")
def envoy() -> Iterator[dict[str, Fdp]]:
    wheels = sorted(REFERENCE.glob("xds_protos-*.whl"))
    assert wheels, (
        f"the reference Envoy protos are missing: no xds_protos-*.whl in {REFERENCE}; "
        "scripts/test downloads it (pip download --no-deps -d .venv/reference xds-protos)"
    )
    with zipfile.ZipFile(wheels[-1]) as whl:
        yield {
            ours: serialized_file(whl.read(f"{theirs}_pb2.py").decode())
            for ours, theirs in ENVOY_FILES.items()
        }


def ours(name: str) -> Fdp:
    return serialized_file((PROTO_DIR / f"{name}_pb2.py").read_text())


def _field_facts(msg: descriptor_pb2.DescriptorProto, f: descriptor_pb2.FieldDescriptorProto) -> tuple[object, ...]:
    oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
    return (f.name, f.number, f.type, f.label, f.type_name, f.json_name, oneof, f.proto3_optional)


def _enum_diffs(path: str, mine: descriptor_pb2.EnumDescriptorProto, theirs: descriptor_pb2.EnumDescriptorProto) -> list[str]:
    a = [(v.name, v.number) for v in mine.value]
    b = [(v.name, v.number) for v in theirs.value]
    return [] if a == b else [f"enum {path}: ours {a} != Envoy's {b}"]


def _message_diffs(path: str, mine: descriptor_pb2.DescriptorProto, theirs: descriptor_pb2.DescriptorProto) -> list[str]:
    out: list[str] = []
    envoy_fields = {f.number: f for f in theirs.field}
    for f in mine.field:
        e = envoy_fields.pop(f.number, None)
        if e is None:
            out.append(f"{path}.{f.name} = {f.number}: Envoy has no field {f.number}")
        elif _field_facts(mine, f) != _field_facts(theirs, e):
            out.append(f"{path}: ours {_field_facts(mine, f)} != Envoy's {_field_facts(theirs, e)}")
    for e in envoy_fields.values():
        if f"{path}.{e.name}" not in OMITTED:
            out.append(f"{path}.{e.name} = {e.number}: Envoy's field is missing from ours")
    nested = {n.name: n for n in theirs.nested_type}
    for n in mine.nested_type:
        if n.name not in nested:
            out.append(f"{path}.{n.name}: no such message in Envoy's")
        else:
            out.extend(_message_diffs(f"{path}.{n.name}", n, nested[n.name]))
    enums = {e.name: e for e in theirs.enum_type}
    for en in mine.enum_type:
        if en.name not in enums:
            out.append(f"{path}.{en.name}: no such enum in Envoy's")
        else:
            out.extend(_enum_diffs(f"{path}.{en.name}", en, enums[en.name]))
    return out


def file_diffs(mine: Fdp, theirs: Fdp) -> list[str]:
    """Every way ``mine`` would not read or write what Envoy's file does."""
    out: list[str] = []
    if mine.package != theirs.package:
        out.append(f"package {mine.package!r} != Envoy's {theirs.package!r}")
    messages = {m.name: m for m in theirs.message_type}
    for m in mine.message_type:
        if m.name not in messages:
            out.append(f"{m.name}: no such message in Envoy's {theirs.name}")
        else:
            out.extend(_message_diffs(f"{mine.package}.{m.name}", m, messages[m.name]))
    enums = {e.name: e for e in theirs.enum_type}
    for en in mine.enum_type:
        out.extend(_enum_diffs(f"{mine.package}.{en.name}", en, enums[en.name]))
    services = {s.name: s for s in theirs.service}
    for s in mine.service:
        def methods(svc: descriptor_pb2.ServiceDescriptorProto) -> list[tuple[object, ...]]:
            return [(m.name, m.input_type, m.output_type, m.client_streaming,
                     m.server_streaming) for m in svc.method]  # fmt: skip
        if s.name not in services or methods(s) != methods(services[s.name]):
            out.append(f"service {s.name}: ours {methods(s)} != Envoy's")
    return out


@pytest.mark.parametrize("name", sorted(ENVOY_FILES))
def test_wire_identical_to_envoy(name: str, envoy: dict[str, Fdp]) -> None:
    assert file_diffs(ours(name), envoy[name]) == []


def test_every_proto_file_is_checked() -> None:
    assert sorted(p.stem for p in PROTO_DIR.glob("*.proto")) == sorted(ENVOY_FILES)


def test_the_comparison_sees_a_renumbered_field(envoy: dict[str, Fdp]) -> None:
    mine = ours("external_auth")
    check_response = next(m for m in mine.message_type if m.name == "CheckResponse")
    check_response.field[0].number = 9
    assert any("CheckResponse" in d for d in file_diffs(mine, envoy["external_auth"]))


def test_the_grpc_paths_are_envoys() -> None:
    from authz.proto import external_auth_pb2_grpc, external_processor_pb2_grpc

    auth = (PROTO_DIR / "external_auth_pb2_grpc.py").read_text()
    proc = (PROTO_DIR / "external_processor_pb2_grpc.py").read_text()
    assert "'/envoy.service.auth.v3.Authorization/Check'" in auth
    assert "'/envoy.service.ext_proc.v3.ExternalProcessor/Process'" in proc
    assert external_auth_pb2_grpc.AuthorizationStub and external_processor_pb2_grpc.ExternalProcessorStub


def test_generated_modules_match_the_proto_files(tmp_path: Path) -> None:
    """scripts/gen-protos run now writes exactly the committed modules."""
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen-protos"), "--out", str(tmp_path)],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    fresh = tmp_path / "authz" / "proto"
    made = sorted(p.name for p in fresh.iterdir())
    committed = sorted(p.name for p in PROTO_DIR.iterdir() if p.name.endswith((".pyi", ".py"))
                       and "_pb2" in p.name)  # fmt: skip
    assert made == committed
    stale = [n for n in made if (fresh / n).read_text() != (PROTO_DIR / n).read_text()]
    assert stale == [], f"run scripts/gen-protos: {stale} differ from their .proto files"
