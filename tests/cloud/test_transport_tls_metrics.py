"""TLS and mutual TLS by config, and the Prometheus endpoint."""

from __future__ import annotations

import socket
import urllib.request

import grpc
import pytest
from transport_support import device_config, running_gateway

from cloud.config import ServerTlsConfig
from cloud.devcerts import write_dev_certs
from device.transport.client import GatewayClient
from device.transport.config import ClientTlsConfig


async def test_mutual_tls_accepts_client_cert_and_refuses_without(tmp_path):
    certs = tmp_path / "certs"
    write_dev_certs(certs, clients=["device"])
    tls = ServerTlsConfig(
        cert_file=certs / "server.crt", key_file=certs / "server.key", client_ca_file=certs / "ca.crt"
    )
    async with running_gateway(tmp_path / "cloud", tls=tls) as gw:
        good = ClientTlsConfig(
            ca_file=certs / "ca.crt", cert_file=certs / "device.crt", key_file=certs / "device.key"
        )
        client = GatewayClient(device_config(tmp_path / "d", f"localhost:{gw.port}", tls=good))
        assert (await client.register()).device_id == "dev-1"
        await client.close()
        anonymous = ClientTlsConfig(ca_file=certs / "ca.crt")
        client = GatewayClient(
            device_config(tmp_path / "d2", f"localhost:{gw.port}", "dev-2", tls=anonymous, rpc_timeout_s=3)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.register()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await client.close()
        plaintext = GatewayClient(
            device_config(tmp_path / "d3", f"localhost:{gw.port}", "dev-3", rpc_timeout_s=3)
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await plaintext.register()
        await plaintext.close()


async def test_server_tls_only(tmp_path):
    certs = tmp_path / "certs"
    write_dev_certs(certs)
    tls = ServerTlsConfig(cert_file=certs / "server.crt", key_file=certs / "server.key")
    async with running_gateway(tmp_path / "cloud", tls=tls) as gw:
        ctls = ClientTlsConfig(ca_file=certs / "ca.crt")
        client = GatewayClient(device_config(tmp_path / "d", f"127.0.0.1:{gw.port}", tls=ctls))
        assert (await client.register()).device_id == "dev-1"
        await client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_prometheus_metrics_count_calls(tmp_path):
    port = _free_port()
    async with running_gateway(tmp_path / "cloud", metrics_port=port) as gw:
        client = GatewayClient(device_config(tmp_path / "d", gw.address))
        await client.register()
        await client.heartbeat("ok", "v0", {}, 0)
        await client.close()
        import asyncio

        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
        )
    text = body.decode()
    assert 'tandem_gateway_calls_total{code="OK",method="Register"} 1.0' in text
    assert 'tandem_gateway_calls_total{code="OK",method="Heartbeat"} 1.0' in text


async def test_client_cert_bound_to_device_id(tmp_path):
    certs = tmp_path / "certs"
    write_dev_certs(certs, clients=["dev-1", "dev-2"])
    tls = ServerTlsConfig(
        cert_file=certs / "server.crt",
        key_file=certs / "server.key",
        client_ca_file=certs / "ca.crt",
        bind_client_cert_to_device=True,
    )
    async with running_gateway(tmp_path / "cloud", tls=tls) as gw:
        own = ClientTlsConfig(
            ca_file=certs / "ca.crt", cert_file=certs / "dev-1.crt", key_file=certs / "dev-1.key"
        )
        client = GatewayClient(device_config(tmp_path / "a", f"localhost:{gw.port}", "dev-1", tls=own))
        await client.register()
        assert (await client.heartbeat("ok", "v0", {}, 0)).server_unix_ms > 0
        await client.close()
        other = ClientTlsConfig(
            ca_file=certs / "ca.crt", cert_file=certs / "dev-2.crt", key_file=certs / "dev-2.key"
        )
        client = GatewayClient(device_config(tmp_path / "b", f"localhost:{gw.port}", "dev-1", tls=other))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.register()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "dev-2" in err.value.details()
        await client.close()
