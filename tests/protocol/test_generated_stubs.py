"""Committed stubs match a fresh generation from the .proto files."""

from __future__ import annotations

import shutil

from protocol import generate


def test_committed_stubs_match_regeneration():
    assert generate.diff_against_committed() == []


def test_check_detects_a_stale_stub(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(generate.REPO_ROOT / "protocol", root / "protocol")
    stub = root / generate.PROTO_DIR / "gateway_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    (root / generate.PROTO_DIR / "old_pb2.py").write_text("")
    assert generate.diff_against_committed(root) == [
        "stale extra file: old_pb2.py",
        "differs: gateway_pb2.py",
    ]


def test_generated_modules_import_by_package_path():
    from protocol.tandem.v1 import gateway_pb2, gateway_pb2_grpc

    assert gateway_pb2.DESCRIPTOR.package == "tandem.v1"
    assert hasattr(gateway_pb2_grpc, "DeviceGatewayStub")
    names = [m.name for m in gateway_pb2.DESCRIPTOR.services_by_name["DeviceGateway"].methods]
    assert names == ["Register", "Upload", "FetchUpdate", "WatchUpdates", "Heartbeat"]
