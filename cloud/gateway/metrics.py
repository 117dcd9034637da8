"""Prometheus metrics of one gateway instance (own registry, so several gateways can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class GatewayMetrics:
    """Counters and histograms the gateway updates; ``serve_http`` exposes them on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter("tandem_gateway_calls", "RPCs by method and status code", ["method", "code"], registry=r)
        self.samples_stored = Counter("tandem_gateway_samples_stored", "Samples newly stored", registry=r)
        self.samples_duplicate = Counter("tandem_gateway_samples_duplicate", "Resent samples ignored", registry=r)
        self.upload_bytes = Counter("tandem_gateway_upload_bytes", "Sample payload bytes received", registry=r)
        self.update_bytes = Counter("tandem_gateway_update_bytes", "Update payload bytes sent", registry=r)
        self.commit_seconds = Histogram(
            "tandem_gateway_commit_seconds",
            "Duration of one group commit",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.commit_samples = Histogram(
            "tandem_gateway_commit_samples",
            "Samples per group commit",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.active_streams = Gauge("tandem_gateway_active_streams", "Open streaming RPCs", ["method"], registry=r)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> None:
        """Start the ``/metrics`` HTTP endpoint in a background thread."""
        self._http = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        """Stop the ``/metrics`` endpoint if it runs."""
        http = getattr(self, "_http", None)
        if http is not None:
            server, thread = http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
