"""The gRPC gateway devices talk to (``tandem.v1.DeviceGateway``)."""

from cloud.gateway.server import GatewayServer

__all__ = ["GatewayServer"]
