"""``tandem-sim fleet run``: the real cloud service and N real device agents behind emulated links, driven by a
scenario, measured over time, reported in ``reports/<run>/``.

By default the run is on virtual time (``sim/clock.py``, ``sim/fleet/lockstep.py``): answers take what the device
profile's hardware would take, jobs what the cloud profile's cluster would, links what their emulated figures
say, and the host's speed only changes how long the run takes. ``realtime`` keeps the wall clock (soak tests of
the real stack)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from common import clock as clocks
from device.agent.shared_batcher import SharedBatcher
from device.agent.tenants import TenantModels
from sim.clock import VirtualClock
from sim.fleet.ceiling import measure_ceiling
from sim.fleet.cloud_process import CloudProcess
from sim.fleet.collect import collect_results
from sim.fleet.devices import SimDevice
from sim.fleet.evaluate import Evaluator
from sim.fleet.lockstep import Lockstep
from sim.fleet.profiles import CloudProfile, DeviceProfile, cloud_profile, device_profile
from sim.fleet.results import FleetResult, Point
from sim.fleet.scenario import Scenario
from sim.fleet.shared_model import rss_bytes, shared_copy
from sim.fleet.zoo import FleetZoo, resolve_zoo
from sim.world import World

log = logging.getLogger("tandem.sim.fleet")

TICK_S = 0.25
"""How often the harness looks at every agent (versions, rollbacks, acks)."""
EPSILON_S = 1e-6
"""Virtual moments closer than this are the same moment (float sums of steps)."""
START_WAVE = 50
START_WAVE_GAP_S = 0.2
"""Agents start in waves of ``START_WAVE``, ``START_WAVE_GAP_S`` of scenario time apart (before time 0), so their
connections are made a wave at a time."""
POOL_WAIT_S = 0.002
"""Wall seconds the shared batcher waits for more rows once it has some (the frames of one moment arrive
together, from many agents' source loops)."""


@dataclass
class RunOptions:
    """How to run a scenario (beyond the scenario itself)."""

    out_dir: Path = Path("reports")
    run_name: str | None = None
    drain_s: float = 20.0
    """After the scenario's duration, how long the agents may keep uplinking what their outboxes hold."""
    cloud_threads: int = 1
    progress: Callable[[dict], None] | None = None
    """Called about once a second with a live snapshot (the CLI shows it with rich)."""
    realtime: bool = False
    """Run on the wall clock (the host's speed shows in every figure) instead of virtual time."""
    device_profile: str | None = None
    """Overrides the scenario's device profile (``sim/profiles/devices.yaml``)."""
    cloud_profile: str | None = None
    """Overrides the scenario's cloud profile (``sim/profiles/clouds.yaml``)."""
    ceiling: bool = True
    """After the run, replay the cloud's jobs with true labels (``sim.fleet.ceiling``) for the ceiling column."""
    batch_rows: int = 32
    """Most frames (of any agents) in one batched forward of the shared batcher."""


@dataclass
class Models:
    """What the harness loads once: the device base (shared by every agent) and the teacher (references)."""

    zoo: FleetZoo
    device: Any
    processor: Any
    teacher: Any
    teacher_prompts: Any
    image_size: int


def load_models(zoo: FleetZoo) -> Models:
    """Load the zoo's device and teacher with the same loader as the roles (``common.modeling.load_mllm``)."""
    from common.llava_tokens import PromptBuilder
    from common.modeling import load_mllm

    dev = load_mllm(zoo.device)
    teacher = load_mllm(zoo.teacher)
    for m in (dev.model, teacher.model):
        m.eval().requires_grad_(False)
    tok = teacher.processor.tokenizer
    prompts = PromptBuilder(tok, int(teacher.model.config.image_token_id))
    size = int(dev.processor.image_processor.crop_size["height"])
    return Models(zoo, dev.model, dev.processor, teacher.model, prompts, size)


def cloud_overrides(scenario: Scenario, zoo: FleetZoo, simulation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cloud service's config for this run: the zoo's models, then the scenario's overrides, then (on virtual
    time) the clock file and the modelled cluster."""
    from sim.fleet.cloud_settings import cloud_settings

    settings = cloud_settings(zoo, scenario.cloud, scenario.agent)
    if simulation is not None:
        settings["simulation"] = simulation
    return settings


@dataclass
class FleetRunner:
    """Runs one scenario end to end."""

    scenario: Scenario
    options: RunOptions = field(default_factory=RunOptions)
    clock: clocks.Clock = field(default=clocks.WALL, init=False)
    lockstep: Lockstep | None = field(default=None, init=False)
    pool: SharedBatcher | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        stamp = f"{self.scenario.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
        self._run_name = self.options.run_name or stamp

    def run_dir(self) -> Path:
        """Where this run's state (``state/``) and report (``index.html``, ``results.json``) live."""
        return self.options.out_dir / self._run_name

    def run(self) -> FleetResult:
        """Run the scenario; returns what was measured (the caller writes the report)."""
        return asyncio.run(self._run())

    def profiles(self) -> tuple[DeviceProfile, CloudProfile]:
        """The device and cloud profiles this run models (options first, then the scenario)."""
        o, sc = self.options, self.scenario
        return device_profile(o.device_profile or sc.device_profile), cloud_profile(o.cloud_profile or sc.cloud_profile)

    async def _pace(self, seconds: float) -> None:
        """Let ``seconds`` pass on the run's clock."""
        if self.lockstep is None:
            await asyncio.sleep(seconds)
        else:
            await self.lockstep.run_for(seconds)

    async def _while(self, work) -> Any:
        """Await ``work`` while time keeps moving (virtual time needs the harness to move it)."""
        task = asyncio.ensure_future(work)
        if self.lockstep is not None:
            await self.lockstep.run_while(task)
        return await task

    async def _run(self) -> FleetResult:
        run_dir = self.run_dir()
        dev_profile, cl_profile = self.profiles()
        self.clock = clocks.WALL if self.options.realtime else VirtualClock(run_dir / "state" / "clock.bin")
        previous = clocks.install(self.clock)
        try:
            result = await self._run_on_clock(dev_profile, cl_profile)
        finally:
            clocks.install(previous)
            if isinstance(self.clock, VirtualClock):
                self.clock.close()
        return result

    async def _run_on_clock(self, dev_profile: DeviceProfile, cl_profile: CloudProfile) -> FleetResult:
        sc = self.scenario
        clock = self.clock
        # Every agent polls its source, reads its outbox and stores adapters through asyncio.to_thread: with N
        # agents in one loop the default pool (cores + 4 threads) would queue them behind each other.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=min(256, 8 + 2 * len(sc.devices())))
        )
        run_dir = self.run_dir()
        state_dir = run_dir / "state"
        started = time.perf_counter()
        zoo = resolve_zoo(sc.zoo, sc.seed)
        models = await asyncio.to_thread(load_models, zoo)
        world = World(sc.seed, models.image_size)
        devices: list[SimDevice] = []
        simulation = None
        if isinstance(clock, VirtualClock):
            assert clock.shared is not None
            simulation = cl_profile.simulation(clock.shared.path)
            self.lockstep = Lockstep(clock, lambda: _any_busy(devices), lambda: [d.proxy for d in devices])
        cloud = CloudProcess(state_dir / "cloud", cloud_overrides(sc, zoo, simulation), self.options.cloud_threads)
        gateway = await cloud.start()
        host, _, port = gateway.rpartition(":")
        facts: dict[str, Any] = {
            "zoo": zoo.name,
            "gateway": gateway,
            "clock": "wall" if self.lockstep is None else "virtual",
            "device_profile": dev_profile.model_dump(),
            "cloud_profile": cl_profile.model_dump(),
        }
        try:
            evaluator = await asyncio.to_thread(self._evaluator, models, world)
            facts.update(await asyncio.to_thread(_byte_references, evaluator, models, world))
            self.pool = await asyncio.to_thread(self._shared_batcher, models)
            rss_before = rss_bytes()
            compute = None if self.lockstep is None else dev_profile.batch_seconds
            await self._while(self._create_devices(devices, state_dir, (host, int(port)), models, world, compute))
            waves = [devices[i : i + START_WAVE] for i in range(0, len(devices), START_WAVE)]
            lead = 1.0 + START_WAVE_GAP_S * len(waves)
            epoch = clock.monotonic() + lead
            facts["epoch_unix_ms"] = int((clock.time() + lead) * 1000)
            for wave in waves:  # a thousand agents connecting at once would storm the links and the gateway
                for d in wave:
                    d.start_clock(epoch)
                    await d.agent.start()
                await self._pace(START_WAVE_GAP_S)
            facts["setup_s"] = time.perf_counter() - started
            measured_from = time.perf_counter()
            await self._measure(devices, evaluator, epoch)
            facts["measure_wall_s"] = time.perf_counter() - measured_from
            facts["memory_per_agent_mb"] = (rss_bytes() - rss_before) / len(devices) / 2**20
            facts["rss_shared_mb"] = rss_before / 2**20
            facts["batched_forwards"] = self.pool.batches
            facts["rows_per_forward"] = self.pool.rows / max(1, self.pool.batches)
            await self._drain(devices)
            facts["virtual_s"] = clock.monotonic() - epoch
        finally:
            stopping = time.perf_counter()
            await asyncio.gather(*(_stop_device(d) for d in devices))  # at once: each waits on its own channel
            facts["stop_devices_s"] = time.perf_counter() - stopping
            facts["cloud_exit_code"] = await cloud.stop()
        facts["wall_s"] = time.perf_counter() - started
        facts["slowdown"] = facts.get("measure_wall_s", 0.0) / sc.duration_s
        if self.lockstep is not None:
            facts["lockstep"] = vars(self.lockstep.stats)
        result = collect_results(run_dir.name, sc, devices, cloud, facts)
        if self.options.ceiling:
            args = (result, devices, cloud, models.teacher, models.teacher_prompts, world, evaluator)
            await asyncio.to_thread(measure_ceiling, *args)
        return result

    async def _create_devices(
        self,
        devices: list[SimDevice],
        state_dir: Path,
        gateway: tuple[str, int],
        models: Models,
        world: World,
        compute_model=None,
    ) -> None:
        """Link up, register and build every agent into ``devices`` (in scenario order; the caller stops what was
        created if one fails); registrations overlap (a satellite link's round trips)."""
        sc = self.scenario
        gate = asyncio.Semaphore(16)

        async def one(spec):
            async with gate:
                return await SimDevice.create(spec, state_dir, gateway, self.pool, world, sc.agent, compute_model)

        made = await asyncio.gather(*(one(spec) for spec in sc.devices()), return_exceptions=True)
        devices.extend(d for d in made if isinstance(d, SimDevice))
        for d in made:
            if isinstance(d, BaseException):
                raise d

    def _shared_batcher(self, models: Models) -> SharedBatcher:
        """The one device model every agent is a tenant of, and the one batcher that serves them all."""
        from device.agent import DeviceModel, load_agent_config

        cfg = load_agent_config(None, _flat(self.scenario.agent))
        shared = DeviceModel(
            shared_copy(models.device), models.processor, cfg.adapter, cfg.sparse, cfg.model.prompt_template
        )
        return SharedBatcher(TenantModels(shared), max_batch=self.options.batch_rows, max_wait_s=POOL_WAIT_S)

    def _evaluator(self, models: Models, world: World) -> Evaluator:
        from device.agent import DeviceModel, load_agent_config

        cfg = load_agent_config(None, _flat(self.scenario.agent))
        model = DeviceModel(
            shared_copy(models.device), models.processor, cfg.adapter, cfg.sparse, cfg.model.prompt_template
        )
        return Evaluator(model, models.teacher, models.teacher_prompts, world, self.scenario.eval_samples)

    async def _measure(self, devices: list[SimDevice], evaluator: Evaluator, epoch: float) -> None:
        """Tick every agent; every ``measure_every_s`` score each device's current adapters on its domain."""
        sc = self.scenario
        next_measure = 0.0
        last_progress = 0.0
        clock = self.clock
        await self._pace(max(0.0, epoch - clock.monotonic()))
        while (t := clock.monotonic() - epoch) < sc.duration_s - EPSILON_S:
            if t >= next_measure - EPSILON_S:  # epoch + next_measure - epoch may fall a hair short of it
                await asyncio.to_thread(self._measure_all, devices, evaluator, t)
                while next_measure <= clock.monotonic() - epoch + EPSILON_S:  # a slow one skips the missed ones
                    next_measure += sc.measure_every_s
            if self.options.progress is not None and t - last_progress >= 1.0:
                last_progress = t
                self.options.progress(_snapshot(devices, t, sc.duration_s))
            if self.lockstep is None:
                await asyncio.sleep(TICK_S)
            else:  # to the next tick, measurement or the end, whichever comes first (absolute: no rounding drift)
                await self.lockstep.run_until(epoch + min(t + TICK_S, sc.duration_s, next_measure))
        for d in devices:  # the world stops at the scenario's end; the uplinks drain afterwards
            d.source.stop()
        t = clock.monotonic() - epoch
        await asyncio.to_thread(self._measure_all, devices, evaluator, t)

    def _measure_all(self, devices: list[SimDevice], evaluator: Evaluator, t: float) -> None:
        """One point per device at ``t`` (one worker thread for the whole fleet)."""
        for d in devices:
            d.points.append(self._point(d, evaluator, t))

    @staticmethod
    def _point(d: SimDevice, evaluator: Evaluator, t: float) -> Point:
        domain = d.spec.drift.domain_at(t)
        adapter = d.agent.step.model.adapter
        acc = evaluator.accuracy(adapter, domain)
        none, teacher = evaluator.references(domain)
        stats = d.proxy.stats
        return Point(
            t_s=round(t, 3),
            domain=domain,
            version=adapter.version,
            accuracy=acc,
            none=none,
            teacher=teacher,
            up_bytes=stats.bytes_up,
            down_bytes=stats.bytes_down,
            stream_accuracy=d.probe.take_window(),
        )

    async def _drain(self, devices: list[SimDevice]) -> None:
        """Stop the world, then give the uplinks ``drain_s`` to empty the outboxes (nothing acked is lost, and
        what is still queued is reported as pending)."""
        clock = self.clock
        deadline = clock.monotonic() + self.options.drain_s
        while clock.monotonic() < deadline:
            pending = [await asyncio.to_thread(lambda a=d.agent: a.outbox.stats().pending) for d in devices]
            if not any(pending):
                break
            await self._pace(0.5)


def _any_busy(devices: list[SimDevice]) -> bool:
    return any(d.agent.host_busy or d.source.polling for d in devices)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _byte_references(evaluator: Evaluator, models: Models, world: World) -> dict[str, Any]:
    """What one all-token upload weighs (send-everything) and the fp32 adapter's size (downlink reference)."""
    from common.sample_codec import UploadSample, encode_sample

    held = evaluator.held_out("clear")
    n = min(16, len(held.questions))
    sizes = []
    for i in range(n):
        feats = held.features[i]
        tokens = feats.shape[0]
        top = torch.arange(5)
        sample = UploadSample(feats, torch.arange(tokens), tokens, held.questions[i], top, torch.full((5,), 0.2))
        sizes.append(len(encode_sample(sample)))
    from cloud.dwc import full_state_bytes

    fp32 = full_state_bytes(evaluator.initial.state)  # as the offline experiment counts it (fp32 safetensors)
    return {"send_all_sample_bytes": sum(sizes) / len(sizes), "fp32_adapter_bytes": fp32}


async def _stop_device(d: SimDevice) -> None:
    """Stop one device's agent, then its link (errors are the run's end, not news)."""
    with contextlib.suppress(Exception):
        await d.agent.stop()
    with contextlib.suppress(Exception):
        await d.proxy.stop()


def _snapshot(devices: list[SimDevice], t: float, duration: float) -> dict:
    rows = []
    for d in devices:
        last = d.points[-1] if d.points else None
        rows.append(
            {
                "device": d.spec.device_id,
                "version": d.agent.step.version,
                "domain": d.spec.drift.domain_at(t),
                "frames": d.source.emitted,
                "queued": len(d.probe.data.queued),
                "acked": d.probe.acked_seq,
                "updates": len(d.probe.data.applied),
                "rollbacks": len(d.probe.data.rollbacks),
                "up_kb": d.proxy.stats.bytes_up / 1024,
                "down_kb": d.proxy.stats.bytes_down / 1024,
                "accuracy": last.accuracy if last else None,
            }
        )
    return {"t": t, "duration": duration, "devices": rows}
