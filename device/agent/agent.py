"""The device agent: model + adapters + UTS + micro-batcher + sources + link + guard + metrics.

``DeviceAgent`` is the long-running core behind ``tandem-device run``; its local gRPC API is wired by the composer
(``device.agent.service.AgentService``). The fleet simulator runs it unchanged (adding its world as one more
``Source``). Updates are applied off the request path and swapped between batches;
the regression guard rolls a swap back when the answers after it are less confident.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from common import clock as clocks
from common.errors import TandemError
from device.agent.applier import apply_dwc
from device.agent.batcher import ComputeModel, MicroBatcher, Request
from device.agent.config import AgentConfig
from device.agent.events import AgentListener, Listeners
from device.agent.guard import GuardDecision, RegressionGuard
from device.agent.link import HeartbeatInfo, LinkLoops
from device.agent.metrics import AgentMetrics
from device.agent.outbox_writer import OutboxWriter
from device.agent.requests import check_ask
from device.agent.runtime import DeviceModel
from device.agent.sdnotify import SystemdNotifier
from device.agent.shared_batcher import Lane, SharedBatcher
from device.agent.sources import CameraSource, DirectorySource, Source, decode_image
from device.agent.step import Answer, DeviceStep, Frame
from device.agent.store import AdapterState, AdapterStore
from device.transport.identity import DeviceIdentity, NotRegisteredError
from device.transport.outbox import Outbox
from device.uts import UncertaintyTokenSampler
from device.uts.basis import CloudAccepts, held_basis, negotiated
from protocol.tandem.v1 import agent_pb2

log = logging.getLogger("tandem.device.agent")


class DeviceAgent:
    """One device: call ``start()``, then ``ask()`` (or serve it with ``AgentService``), and ``stop()``."""

    def __init__(
        self,
        config: AgentConfig,
        model: DeviceModel | None = None,
        connect: bool = True,
        compute_model: ComputeModel | None = None,
        shared_batcher: SharedBatcher | None = None,
    ) -> None:
        """``shared_batcher``: serve from one batcher shared with other agents in this process (``model`` must be
        a tenant of its shared model, ``device.agent.tenants``) instead of a batcher of its own."""
        self.config = config
        self.connect = connect
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.identity: DeviceIdentity | None = None
        if connect:
            try:
                self.identity = DeviceIdentity.load(self.state_dir)
            except NotRegisteredError as exc:
                raise TandemError(f"{exc}; run `tandem-device register` first (or run with --offline)") from None
        self.model = model or self._load_model()
        self.store = AdapterStore(self.state_dir / "adapters", self.model.peft_config())
        self._restore_adapter()
        max_sample = self.identity.max_sample_bytes if self.identity else None
        self.outbox = Outbox(self.state_dir / "outbox.db", max_sample or None)
        self.uts = UncertaintyTokenSampler(config.uts) if config.uts.enabled else None
        self.events = Listeners()
        self.basis = held_basis(config.model.source, self.state_dir) if self.uts is not None else None
        held = self.identity
        self._negotiate(CloudAccepts(held.sample_formats, held.feature_bases) if held else CloudAccepts())
        self.writer = OutboxWriter(self.outbox)
        self.writer.on_written = self._sample_written
        self.step = DeviceStep(self.model, self.uts, sink=self.writer.put)
        g = config.guard
        self.guard = RegressionGuard(g.window, g.margin, g.metric) if g.enabled else None
        self.metrics = AgentMetrics()
        self.metrics.set_version(self.step.version)
        api = config.api
        self.batcher: MicroBatcher | Lane
        if shared_batcher is None:
            self.batcher = MicroBatcher(
                self.step, api.max_batch, api.max_wait_ms / 1e3, api.max_queue, self._after_batch, compute_model
            )
        else:
            self.batcher = shared_batcher.lane(self.step, self._after_batch, compute_model)
        self.notifier = SystemdNotifier()
        self.link: LinkLoops | None = None
        self.sources: list[tuple[Source, float]] = []
        self._metrics_server = None
        self.metrics_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._apply_lock = asyncio.Lock()
        self._applying = 0
        """Updates being decoded and stored on this host right now (not counting the wait for a swap slot)."""
        self.clock = clocks.current()
        self._started = self.clock.monotonic()
        self.counts = {"requests": 0, "selected": 0, "swaps": 0, "rollbacks": 0}
        self.last_rollback = ""

    # -- set-up --------------------------------------------------------------------------------------------
    def _load_model(self) -> DeviceModel:
        m, a = self.config.model, self.config.adapter
        return DeviceModel.load(
            m.source,
            quantization=m.quantization,
            device_map=m.device_map,
            dtype=m.dtype,
            adapter=a,
            adapter_init=a.init,
            sparse=self.config.sparse,
            prompt_template=m.prompt_template,
            max_new_tokens=m.max_new_tokens,
        )

    def _restore_adapter(self) -> None:
        """Serve exactly the version held before a restart; the first start stores version 0."""
        if self.store.empty:
            initial = AdapterState(self.config.transport.initial_version, self.model.adapter_weights())
            self.store.commit(initial)
            self.model.install(initial)
            log.info("adapter %s stored (digest %s)", initial.version, initial.digest()[:12])
        else:
            held = self.store.current()
            self.model.install(held)
            log.info("serving adapter %s held before the restart (digest %s)", held.version, held.digest()[:12])

    def subscribe(self, listener: AgentListener) -> None:
        """Observe answers, queued samples, acks, applied updates and rollbacks (``device.agent.events``)."""
        self.events.add(listener)

    @property
    def host_busy(self) -> bool:
        """True while frames, samples or an update are still being worked on by this machine (the simulator
        lets virtual time pass only when no agent is busy)."""
        return self.batcher.host_busy or self.writer.waiting > 0 or self.writer.writing or self._applying > 0

    def _sample_written(self, seq: int, payload: bytes, metadata: dict[str, str]) -> None:
        self.events.sample_queued(seq, len(payload), metadata)

    def add_source(self, source: Source, interval_s: float) -> None:
        """Poll ``source`` every ``interval_s`` (before or after ``start``)."""
        self.sources.append((source, interval_s))
        if self._loop is not None:
            self._tasks.append(self._loop.create_task(self._source_loop(source, interval_s)))

    def _configured_sources(self) -> None:
        s = self.config.sources
        if s.directory is not None:
            state_file = self.state_dir / "sources" / "directory.json"
            src = DirectorySource(s.directory.path, s.directory.questions, state_file, self.config.api.max_image_pixels)
            self.sources.append((src, s.directory.interval_s))
        if s.camera is not None:
            self.sources.append((CameraSource(s.camera.device, s.camera.questions), s.camera.interval_s))

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self, announce: bool = True) -> None:
        """Start serving: batcher, metrics, sources, link loops, watchdog; then tell systemd it is ready (unless
        ``announce`` is False: a composer that starts a front end after the core calls ``announce_ready``)."""
        self._loop = asyncio.get_running_loop()
        self._configured_sources()
        self.batcher.start()
        if self.config.metrics.port is not None:
            self._metrics_server = self.metrics.serve(self.config.metrics.port, self.config.metrics.host)
            self.metrics_port = self._metrics_server[0].server_port
        if self.connect:
            self.link = LinkLoops(
                self.config.transport,
                self._apply_update,
                self._heartbeat_info,
                self.identity,
                on_sent=self._heartbeat_sent,
                outbox=self.outbox,
            )
            self.link.uplink.on_acked = self.events.uploaded
            fetcher = self.link.fetcher
            if fetcher.state.current_version != self.step.version:  # killed between the store commit and this
                fetcher.state.current_version = self.step.version
                fetcher.state.save()
            self._tasks.append(asyncio.create_task(self.link.run(self._stop), name="link"))
        for source, interval in self.sources:
            self._tasks.append(asyncio.create_task(self._source_loop(source, interval)))
        if self.uts is not None:
            self._tasks.append(asyncio.create_task(self._uts_periods(), name="uts-periods"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        if announce:
            self.announce_ready()
        log.info("agent started: adapter %s", self.step.version)

    def announce_ready(self) -> None:
        """Tell systemd the agent serves (``READY=1``, with the adapter version held)."""
        self.notifier.ready(f"serving adapter {self.step.version}")

    async def stop(self) -> None:
        """Stop everything; queued samples stay in the outbox."""
        self.notifier.stopping()
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        await asyncio.to_thread(self.batcher.stop)
        if self.link is not None:
            await self.link.client.close()
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            thread.join(5)
        for source, _ in self.sources:
            source.close()
        await asyncio.to_thread(self.writer.close)
        self.outbox.close()

    async def run_until(self, stop: asyncio.Event) -> None:
        """``start``, serve until ``stop`` is set or a loop fails for good, then ``stop``."""
        await self.start()
        try:
            await self.wait_until(stop)
        finally:
            await self.stop()

    async def wait_until(self, stop: asyncio.Event) -> None:
        """Return when ``stop`` is set; raise what a loop that failed for good (the link) raised."""
        waiter = asyncio.create_task(stop.wait())
        watched = [waiter, *[t for t in self._tasks if t.get_name() == "link"]]
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not waiter and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            waiter.cancel()

    # -- answering -----------------------------------------------------------------------------------------
    async def answer(self, frame: Frame, source: str = "api") -> Answer:
        """Queue a frame for the next batch and wait for its answer."""
        fut = self.batcher.submit(frame, source)
        return await asyncio.wait_for(asyncio.wrap_future(fut), self.config.api.request_timeout_s)

    async def ask(self, image: bytes, question: str, max_new_tokens: int | None = None) -> Answer:
        """The Python API: JPEG/PNG bytes + question -> Answer (validated like the gRPC API)."""
        request = agent_pb2.AskRequest(image=image, question=question, max_new_tokens=max_new_tokens or 0)
        check_ask(request, self.config.api)
        pixels = await asyncio.to_thread(decode_image, image, self.config.api.max_image_pixels)
        return await self.answer(Frame(question.strip(), image=pixels, max_new_tokens=max_new_tokens), "python")

    def _after_batch(self, requests: list[Request], answers: list[Answer], forward_s: float) -> None:
        """Worker thread, after each batch: metrics, and the guard's verdict once K answers followed a swap."""
        m = self.metrics
        m.batch_size.observe(len(answers))
        for r, a in zip(requests, answers, strict=True):
            m.requests.labels(r.source, "ok").inc()
            m.latency.observe(a.latency_s)
            m.tokens_kept.observe(a.kept_tokens)
            m.uncertainty.observe(a.score)
            if a.sent:
                m.selected.inc()
                self.counts["selected"] += 1
        self.counts["requests"] += len(answers)
        self.events.answered(requests, answers)
        if self.guard is None:
            return
        armed = self.guard.armed_version
        self.guard.observe([a.confidence for a in answers], [a.uncertainty["entropy"] for a in answers])
        decision = self.guard.decision()
        if decision is not None and decision.rollback and self._loop is not None and armed is not None:
            self._loop.call_soon_threadsafe(self._schedule_rollback, armed, decision)
        elif decision is not None:
            log.info("guard keeps %s: %s", armed, decision.reason)

    async def _source_loop(self, source: Source, interval: float) -> None:
        while not self._stop.is_set():
            try:
                frames = await asyncio.to_thread(source.poll)
                futures = [asyncio.wrap_future(self.batcher.submit(f, source.name)) for f in frames]
                for fut in asyncio.as_completed(futures):
                    with contextlib.suppress(Exception):
                        await fut
            except Exception:  # one bad poll never stops the source
                log.exception("source %s failed", source.name)
            await self.clock.wait(self._stop, interval)

    async def _uts_periods(self) -> None:
        assert self.uts is not None
        while not self._stop.is_set():
            await self.clock.wait(self._stop, self.config.uts.period_s)
            gate = self.uts.gate
            await asyncio.wrap_future(self.batcher.between_batches(gate.start_period))

    async def _housekeeping(self) -> None:
        """Outbox gauges every second; watchdog keep-alives while the worker and the loop are alive."""
        interval = min(1.0, self.notifier.watchdog_interval_s or 1.0)
        while not self._stop.is_set():
            stats = await asyncio.to_thread(self.outbox.stats)
            self.metrics.outbox_depth.set(stats.pending)
            self.metrics.outbox_bytes.set(stats.pending_bytes)
            if self.batcher.alive:
                self.notifier.watchdog()
            await self.clock.wait(self._stop, interval)

    # -- updates -------------------------------------------------------------------------------------------
    def _install(self, adapter: AdapterState, arm: bool) -> None:
        """Worker thread, between batches."""
        self.step.swap(adapter)
        self.metrics.set_version(adapter.version)
        if self.guard is not None:
            if arm:
                self.guard.arm(adapter.version)
            else:
                self.guard.disarm()

    async def _apply_update(self, payload: bytes, header) -> None:
        """Fetcher callback: apply off the request path, store durably, swap between batches."""
        async with self._apply_lock:
            current = self.step.model.adapter
            self._applying += 1
            try:
                new = await asyncio.to_thread(apply_dwc, current, payload, header)
                await asyncio.to_thread(self.store.commit, new)
            except Exception as exc:
                log.warning("update %s rejected, %s keeps serving: %s", header.update_id, current.version, exc)
                raise
            finally:
                self._applying -= 1
            await asyncio.wrap_future(self.batcher.between_batches(lambda: self._install(new, arm=True)))
            self.counts["swaps"] += 1
            self.events.applied(new.version, int(header.update_id))
            self.metrics.swaps.inc()
            log.info("swapped adapter %s -> %s (digest %s)", current.version, new.version, new.digest()[:12])

    def _schedule_rollback(self, version: str, decision: GuardDecision) -> None:
        self._tasks.append(asyncio.create_task(self._rollback(version, decision), name="rollback"))

    async def _rollback(self, version: str, decision: GuardDecision) -> None:
        async with self._apply_lock:
            if self.step.version != version:
                return  # another update came first
            previous = await asyncio.to_thread(self.store.rollback, decision.reason)
            if self.link is not None:  # before any await: a heartbeat names the version held with the rollback
                self.link.fetcher.state.current_version = previous.version
                self.link.fetcher.state.save()
            await asyncio.wrap_future(self.batcher.between_batches(lambda: self._install(previous, arm=False)))
            self.counts["rollbacks"] += 1
            self.metrics.rollbacks.inc()
            self.last_rollback = f"{version}: {decision.reason}"
            self.events.rolled_back(version, previous.version, decision.reason)
            log.warning("rolled back %s -> %s: %s", version, previous.version, decision.reason)
        if self.link is not None:
            with contextlib.suppress(Exception):
                await self.link.heartbeat_once()

    def _heartbeat_info(self) -> HeartbeatInfo:
        pending = self.store.pending_rollback()
        held = self.link.fetcher.current_version if self.link is not None else None
        if pending is not None and held == pending.rolled_back_from:
            pending = None  # mid-rollback (the store moved, the held version not yet): the next heartbeat says it
        c = self.counts
        metrics = {k: float(v) for k, v in c.items()}
        metrics["queue_depth"] = float(self.batcher.depth)
        return HeartbeatInfo(
            status="ok",
            metrics=metrics,
            rolled_back_from=pending.rolled_back_from if pending else "",
            rollback_reason=pending.reason if pending else "",
            downlink_bytes_per_s=self.config.link.downlink_bytes_per_s,
            uplink_bytes_per_s=self.config.link.uplink_bytes_per_s,
        )

    def _negotiate(self, accepts: CloudAccepts) -> None:
        """Encode uploads in format /2 when the cloud decodes it on our basis, else /1."""
        if self.uts is not None:
            self.uts.set_basis(negotiated(self.basis, accepts))

    def _heartbeat_sent(self, info: HeartbeatInfo) -> None:
        if self.link is not None:
            self._negotiate(self.link.cloud_accepts)
        if info.rolled_back_from:
            pending = self.store.pending_rollback()
            if pending is not None and pending.rolled_back_from == info.rolled_back_from:
                self.store.acknowledge_rollback()

    def _last_rejection(self) -> str:
        if self.link is None:
            return ""
        rejected = [o for o in self.link.fetcher.outcomes if not o.applied]
        return f"update {rejected[-1].update_id}: {rejected[-1].reason}" if rejected else ""

    # -- status --------------------------------------------------------------------------------------------
    def status(self) -> dict:
        """What ``tandem-device status`` shows (the fields of AgentStatusResponse)."""
        adapter = self.step.model.adapter
        described = self.store.describe()
        stats = self.outbox.stats()
        c = self.counts
        return {
            "device_id": self.identity.device_id if self.identity else (self.config.transport.device_id or ""),
            "adapter_version": adapter.version,
            "adapter_digest": adapter.digest(),
            "previous_version": (described["previous"] or {}).get("version", ""),
            "model_source": str(self.config.model.source),
            "sparse_enabled": self.model.sparse is not None,
            "requests": c["requests"],
            "samples_selected": c["selected"],
            "outbox_depth": stats.pending,
            "outbox_bytes": stats.pending_bytes,
            "swaps": c["swaps"],
            "rollbacks": c["rollbacks"],
            "last_rollback": self.last_rollback,
            "updates_rejected": self.link.fetcher.stats.rejected if self.link else 0,
            "last_rejection": self._last_rejection(),
            "gateway_connected": bool(self.link and self.link.connected),
            "uptime_s": self.clock.monotonic() - self._started,
            "heartbeats": self.link.heartbeats if self.link else 0,
            "queue_depth": self.batcher.depth,
            "sources": [s.name for s, _ in self.sources],
        }
