"""Enrollment is closed by default: operator-provisioned ids, operator-set cohorts, revoked ids stay out."""

from __future__ import annotations

import grpc
import pytest
from transport_support import device_config, running_gateway

from cloud.cli import main as cloud_main
from device.transport.client import GatewayClient


async def _register(tmp_path, address: str, device_id: str, **cfg) -> GatewayClient:
    client = GatewayClient(device_config(tmp_path / device_id, address, device_id, **cfg))
    try:
        await client.register()
    except BaseException:
        await client.close()
        raise
    return client


async def _refused(tmp_path, address: str, device_id: str, **cfg) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _register(tmp_path, address, device_id, **cfg)
    return err.value


async def test_closed_enrollment_provisioned_ids_and_operator_cohorts(tmp_path):
    async with running_gateway(tmp_path / "cloud", open_enrollment=False) as gw:
        err = await _refused(tmp_path, gw.address, "stranger", cohort="jetsons")
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "devices add stranger" in err.details()
        code = gw.devices.provision("cam-1", "jetsons")
        err = await _refused(tmp_path, gw.address, "cam-1", enrollment_secret="guess")
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        client = await _register(tmp_path, gw.address, "cam-1", cohort="someone-elses", enrollment_secret=code)
        assert client.identity.cohort == "jetsons"  # the operator's cohort, not the claimed one
        await client.close()
        err = await _refused(tmp_path, gw.address, "cam-1", enrollment_secret=code)  # the code was used up
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        update = gw.publish_cohort("someone-elses", "v0", "v1", b"not for cam-1")
        assert gw.devices.get("cam-1").cohort == "jetsons" and update.cohort == "someone-elses"


async def test_revoked_id_needs_the_operator_even_with_the_fleet_secret(tmp_path):
    async with running_gateway(tmp_path / "cloud", open_enrollment=False, enrollment_secret="fleet") as gw:
        client = await _register(tmp_path, gw.address, "cam-2", cohort="claimed", enrollment_secret="fleet")
        assert client.identity.cohort == ""  # a secret enrols the id, not the cohort it claims
        await client.close()
        gw.devices.revoke("cam-2")
        err = await _refused(tmp_path, gw.address, "cam-2", enrollment_secret="fleet")
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.details()
        code = gw.devices.provision("cam-2", "night")  # the operator re-admits it
        client = await _register(tmp_path, gw.address, "cam-2", enrollment_secret=code)
        assert client.identity.cohort == "night"
        assert (await client.heartbeat("ok", "v0", {}, 0)).server_unix_ms > 0
        await client.close()


async def test_open_enrollment_is_explicit_and_still_keeps_revoked_ids_out(tmp_path):
    async with running_gateway(tmp_path / "cloud", open_enrollment=True) as gw:
        client = await _register(tmp_path, gw.address, "dev-x", cohort="lab")
        assert client.identity.cohort == "lab"
        await client.close()
        gw.devices.revoke("dev-x")
        err = await _refused(tmp_path, gw.address, "dev-x", cohort="lab")
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_devices_cli_add_set_cohort_revoke(tmp_path, capsys):
    data = str(tmp_path / "cloud")

    def run(*argv: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_info:
            cloud_main(list(argv))
        out, err = capsys.readouterr()
        return int(exit_info.value.code or 0), out, err

    code, out, _ = run("devices", "add", "cam-9", "--cohort", "north", "--data-dir", data)
    assert code == 0 and "provisioned cam-9 (cohort north)" in out
    enrollment_code = out.strip().splitlines()[-1].strip()
    from cloud.devices import DeviceRegistry

    reg = DeviceRegistry(tmp_path / "cloud" / "devices.db")
    assert reg.check_enrollment_code("cam-9", enrollment_code) and reg.get("cam-9").state == "provisioned"
    reg.register("cam-9", cohort="north", model_family="m", model_version="v", capabilities={})
    reg.close()
    code, _, err = run("devices", "add", "cam-9", "--data-dir", data)
    assert code == 1 and "active" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run("devices", "set-cohort", "cam-9", "south", "--data-dir", data)
    assert code == 0 and "cohort south" in out
    code, out, _ = run("devices", "revoke", "cam-9", "--data-dir", data)
    assert code == 0
    code, out, _ = run("devices", "list", "--data-dir", data)
    assert "cam-9" in out and "revoked" in out and "south" in out
    code, _, err = run("devices", "add", "bad id!", "--data-dir", data)
    assert code == 1 and "device id" in err
    code, out, _ = run("devices", "add", "cam-9", "--cohort", "south", "--data-dir", data)
    assert code == 0 and "provisioned cam-9" in out  # re-admitted by the operator
