"""Process wiring of ``tandem-cloud serve``: the trainer beside a gateway (``all``) or alone (``trainer``)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import Literal

from cloud.config import GatewayConfig
from common.errors import TandemError

log = logging.getLogger("tandem.adaptation")
Role = Literal["all", "gateway", "trainer"]


def make_executor(config: GatewayConfig):
    """The configured executor (torch and Ray are imported here, not when the module loads)."""
    from cloud.adaptation.executor import InProcessExecutor

    if config.adaptation.executor == "ray":
        from cloud.adaptation.ray_executor import RayExecutor

        return RayExecutor(config.adaptation, config.adaptation_dir)
    return InProcessExecutor(config.adaptation, config.adaptation_dir)


def build_trainer(config: GatewayConfig, gateway=None, on_publish=None):
    """A ``TrainerService`` on the data directory's stores (a running gateway's own, when given)."""
    from cloud.adaptation.metrics import AdaptationMetrics
    from cloud.adaptation.service import TrainerService
    from cloud.gateway.server import load_or_create_signing_key
    from cloud.stores import open_device_registry, open_job_store, open_sample_store, open_update_registry

    data_dir = Path(config.data_dir)
    state_dir = config.adaptation_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    sync = config.sqlite_synchronous
    if gateway is not None:
        samples, devices, updates = gateway.samples, gateway.devices, gateway.updates
    else:
        samples = open_sample_store(config, data_dir, sync)
        devices = open_device_registry(config, data_dir, sync)
        updates = open_update_registry(config, data_dir, load_or_create_signing_key(config), sync)
    jobs = open_job_store(config, state_dir, sync)
    return TrainerService(
        config.adaptation,
        state_dir,
        samples,
        devices,
        updates,
        jobs,
        make_executor(config),
        AdaptationMetrics(),
        on_publish,
    )


def _stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGINT and SIGTERM set ``stop`` (call on the loop's thread; again after Ray replaced the handlers)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def serve(config: GatewayConfig, role: Role = "all", ready_file: Path | None = None) -> None:
    """Run ``role`` until SIGINT/SIGTERM; then running jobs get ``adaptation.stop_grace_s`` to finish (the rest
    are requeued), Ray shuts down and the gateway stops."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    _stop_on_signals(loop, stop)
    sim = config.simulation
    clock = None
    if sim is not None:  # the fleet simulator drives time (cloud/simulated.py)
        from common.clock import SharedClock, install

        clock = SharedClock(sim.clock_file)
        install(clock)
    gateway = None
    if role in ("all", "gateway"):
        from cloud.gateway import GatewayServer
        from cloud.gateway.malloc import pin_malloc_thresholds

        pin_malloc_thresholds()  # keeps the gateway's resident memory near what uploads use (cloud/gateway/malloc.py)
        gateway = GatewayServer(config)
        if clock is not None:
            from cloud.simulated import CallCounter

            gateway.interceptors.append(CallCounter(clock.file))
        await gateway.start()
    trainer_box: dict = {}
    halt = threading.Event()
    thread = None
    if role in ("all", "trainer"):

        def notify(_record) -> None:
            if gateway is not None and gateway.servicer is not None:
                loop.call_soon_threadsafe(gateway.servicer.notify_published)

        def run_trainer() -> None:
            # Built here, after the gateway serves: importing torch and Ray takes seconds.
            try:
                trainer = build_trainer(config, gateway, notify)
            except Exception as exc:
                log.exception("the trainer could not start")
                trainer_box["error"] = exc
                loop.call_soon_threadsafe(stop.set)
                return
            trainer_box["trainer"] = trainer
            trainer.executor.on_start = lambda: loop.call_soon_threadsafe(_stop_on_signals, loop, stop)
            if gateway is not None:
                gateway.metrics.registry.register(_Forward(trainer.metrics.registry))
            elif config.metrics_port is not None:
                trainer.metrics.serve_http(config.metrics_port, config.host)
            if clock is not None:
                from cloud.simulated import lockstep

                lockstep(trainer, config, clock).run(halt)
                trainer.drain(0.0)  # simulated time stopped with the harness: a held job would never finish
            else:
                trainer.run(halt)
                trainer.drain(config.adaptation.stop_grace_s)

        thread = threading.Thread(target=run_trainer, name="tandem-trainer", daemon=True)
        thread.start()
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(gateway.address if gateway is not None else f"trainer:{config.adaptation_dir}")
        tmp.replace(ready_file)
    log.info("serving role %s", role)
    await stop.wait()
    halt.set()
    if thread is not None:
        await asyncio.to_thread(thread.join, config.adaptation.stop_grace_s + 60)
    if "trainer" in trainer_box:
        trainer_box["trainer"].close()
        trainer_box["trainer"].metrics.close()
    if gateway is not None:
        await gateway.stop()
    if "error" in trainer_box:
        raise TandemError(f"the trainer could not start: {trainer_box['error']}")


class _Forward:
    """Collector that exposes another registry's metrics through the gateway's /metrics."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def collect(self):
        return self.registry.collect()
