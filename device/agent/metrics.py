"""Prometheus metrics of one agent (its own registry, so several agents can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AgentMetrics:
    """Requests, latency, visual tokens kept, uncertainty, uploads, outbox, adapter version, swaps, rollbacks."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tandem_agent_requests", "Answers given", ["source", "outcome"], registry=r)
        self.latency = Histogram(
            "tandem_agent_request_seconds", "Request latency (queue + batch)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "tandem_agent_batch_size", "Frames per batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.tokens_kept = Histogram(
            "tandem_agent_visual_tokens_kept",
            "Visual tokens the last LM layer held",
            buckets=(8, 16, 32, 64, 128, 192, 256, 576, 1024),
            registry=r,
        )
        self.uncertainty = Histogram(
            "tandem_agent_uncertainty",
            "UTS score of each answer (higher = less sure)",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.selected = Counter("tandem_agent_samples_selected", "Samples UTS queued for the cloud", registry=r)
        self.outbox_depth = Gauge("tandem_agent_outbox_depth", "Samples waiting in the outbox", registry=r)
        self.outbox_bytes = Gauge("tandem_agent_outbox_bytes", "Bytes waiting in the outbox", registry=r)
        self.version = Gauge("tandem_agent_adapter_info", "Adapter version served (label)", ["version"], registry=r)
        self.swaps = Counter("tandem_agent_swaps", "Adapter swaps", registry=r)
        self.rollbacks = Counter("tandem_agent_rollbacks", "Rollbacks by the regression guard", registry=r)
        self.rejected = Counter("tandem_agent_updates_rejected", "Updates rejected (verify or apply)", registry=r)
        self._version: str | None = None

    def set_version(self, version: str) -> None:
        if self._version is not None:
            self.version.remove(self._version)
        self.version.labels(version).set(1)
        self._version = version

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Expose ``/metrics``; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
