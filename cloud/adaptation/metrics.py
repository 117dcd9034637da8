"""Prometheus metrics of the trainer (own registry; served on the gateway's or its own /metrics port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cloud.adaptation.jobs import STATES


class AdaptationMetrics:
    """Jobs by state, durations, samples per job, teacher/learner throughput, bytes published, refusals."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.jobs = Gauge("tandem_adaptation_jobs", "Jobs by state", ["state"], registry=r)
        self.job_seconds = Histogram(
            "tandem_adaptation_job_seconds",
            "Wall time of one job attempt",
            ["outcome"],
            registry=r,
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
        )
        self.job_samples = Histogram(
            "tandem_adaptation_job_samples",
            "Samples per job",
            registry=r,
            buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 4096),
        )
        self.teacher_samples_per_s = Gauge(
            "tandem_adaptation_teacher_samples_per_second", "Teacher labelling throughput of the last job", registry=r
        )
        self.learner_samples_per_s = Gauge(
            "tandem_adaptation_learner_samples_per_second",
            "AKD training throughput of the last job (samples x epochs / s)",
            registry=r,
        )
        self.bytes_published = Counter("tandem_adaptation_bytes_published", "Update bytes published", registry=r)
        self.updates_published = Counter("tandem_adaptation_updates_published", "Updates published", registry=r)
        self.refusals = Counter("tandem_adaptation_validation_refusals", "Candidates refused by the gate", registry=r)
        self.skipped_samples = Counter(
            "tandem_adaptation_skipped_samples", "Uploads skipped (corrupt, other family)", registry=r
        )
        self.actor_restarts = Counter("tandem_adaptation_actor_restarts", "Dead learner actors replaced", registry=r)
        self._http = None

    def set_job_counts(self, counts: dict[str, int]) -> None:
        for state in STATES:
            self.jobs.labels(state).set(counts.get(state, 0))

    def observe(self, outcome: str, seconds: float, summary: dict, epochs: int) -> None:
        """Record one finished attempt from its summary."""
        self.job_seconds.labels(outcome).observe(seconds)
        samples = int(summary.get("samples", 0))
        self.job_samples.observe(samples)
        self.skipped_samples.inc(len(summary.get("skipped", [])))
        if summary.get("label_s"):
            self.teacher_samples_per_s.set(samples / max(summary["label_s"], 1e-9))
        train_s = summary.get("seconds", {}).get("train")
        if train_s:
            self.learner_samples_per_s.set(summary.get("trained_on", 0) * epochs / max(train_s, 1e-9))
        if outcome == "refused":
            self.refusals.inc()

    def serve_http(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose ``/metrics``."""
        self._http = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
