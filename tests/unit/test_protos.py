"""Specification of the pdserve.v1 API stubs: committed, current, importable.

The shapes pinned here (which RPCs stream, the zero enum values) are the
contract other services code against; change them only together with them.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "protos" / "generate.py"
STUB_DIR = ROOT / "protos" / "pdserve" / "v1"
PROTOS = sorted(p.stem for p in STUB_DIR.glob("*.proto"))


def load_generate_module():
    spec = importlib.util.spec_from_file_location("pdserve_protos_generate", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_current(tmp_path):
    # Run from elsewhere: the generator must not depend on the working directory.
    result = subprocess.run(
        [sys.executable, str(GENERATE), "--check"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_check_names_stale_missing_and_orphaned_files(tmp_path):
    generate = load_generate_module()
    fresh = generate.generate(tmp_path)
    assert generate.stale_files(fresh) == []
    with (fresh / "decode_pb2.pyi").open("a") as f:
        f.write("# edited by hand\n")
    (fresh / "router_pb2_grpc.py").unlink()
    (fresh / "extra_pb2.py").write_text("")
    assert generate.stale_files(fresh) == ["decode_pb2.pyi", "extra_pb2.py", "router_pb2_grpc.py"]


def test_check_ignores_only_toolchain_version_stamps(tmp_path):
    generate = load_generate_module()
    fresh = generate.generate(tmp_path)
    grpc_file = fresh / "decode_pb2_grpc.py"
    text = grpc_file.read_text()
    stamp = next(line for line in text.splitlines() if line.startswith("GRPC_GENERATED_VERSION"))
    grpc_file.write_text(text.replace(stamp, "GRPC_GENERATED_VERSION = '9.99.0'"))
    assert generate.stale_files(fresh) == []


def test_every_proto_has_its_three_committed_stubs():
    assert PROTOS == ["common", "decode", "kvstore", "prefill", "router", "worker"]
    for name in PROTOS:
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
            assert (STUB_DIR / f"{name}{suffix}").is_file(), f"{name}{suffix}"


@pytest.mark.parametrize("module", [f"{n}{s}" for n in PROTOS for s in ("_pb2", "_pb2_grpc")])
def test_every_module_imports_as_pdserve_v1(module):
    imported = importlib.import_module(f"pdserve.v1.{module}")
    assert Path(imported.__file__).parent == STUB_DIR


def method_shapes(proto: str, service: str) -> dict[str, str]:
    pb2 = importlib.import_module(f"pdserve.v1.{proto}_pb2")
    methods = pb2.DESCRIPTOR.services_by_name[service].methods
    shape = {(False, False): "unary", (False, True): "server-stream"}
    return {m.name: shape[(m.client_streaming, m.server_streaming)] for m in methods}


def test_router_service_shape():
    assert method_shapes("router", "Router") == {
        "Generate": "server-stream",
        "RegisterWorker": "unary",
        "Heartbeat": "unary",
        "DeregisterWorker": "unary",
        "ListWorkers": "unary",
        "SetWorkerRole": "unary",
    }


def test_worker_control_service_shape():
    assert method_shapes("worker", "WorkerControl") == {"SetRole": "unary"}


def test_prefill_service_shape():
    assert method_shapes("prefill", "Prefill") == {"Prefill": "unary", "GetLoad": "unary"}


def test_decode_service_shape():
    assert method_shapes("decode", "Decode") == {
        "Reserve": "unary",
        "Decode": "server-stream",
        "Generate": "server-stream",
        "Release": "unary",
        "GetLoad": "unary",
        "GetStats": "unary",
    }


def test_kvstore_service_shape():
    assert method_shapes("kvstore", "KVStore") == {
        "Lookup": "unary",
        "ReserveWrite": "unary",
        "CommitWrite": "unary",
        "ReserveRead": "unary",
        "Release": "unary",
        "GetStats": "unary",
    }


def test_enums_start_at_an_unspecified_zero():
    common = importlib.import_module("pdserve.v1.common_pb2")
    for enum in common.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name == f"{upper_snake(enum.name)}_UNSPECIFIED"


def upper_snake(name: str) -> str:
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()


def test_kv_bytes_never_travel_over_grpc():
    # Only identifiers, hashes, secrets and addresses may be bytes fields;
    # anything shaped like a KV payload belongs on the UCX data plane.
    allowed = {"secret", "ucx_address", "fingerprint", "kv_fingerprint", "block_hashes"}
    for name in PROTOS:
        pb2 = importlib.import_module(f"pdserve.v1.{name}_pb2")
        for message in pb2.DESCRIPTOR.message_types_by_name.values():
            for field in message.fields:
                if field.type == descriptor.FieldDescriptor.TYPE_BYTES:
                    assert field.name in allowed, f"{message.full_name}.{field.name}"


def test_optional_sampling_fields_distinguish_unset_from_zero():
    from pdserve.v1 import common_pb2

    params = common_pb2.SamplingParams()
    assert not params.HasField("temperature") and not params.HasField("seed")
    params.temperature = 0.0  # greedy, which is not the same as "unset"
    assert params.HasField("temperature")
