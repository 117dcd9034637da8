"""Asyncio TCP proxy between one device and the cloud that shapes and breaks the link."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass

from common import clock as clocks
from sim.link.bucket import TokenBucket
from sim.link.config import LinkConfig
from sim.link.trace import LinkState, LinkTrace

log = logging.getLogger("tandem.sim.link")


@dataclass
class LinkStats:
    """Counters of the proxy's lifetime."""

    connections: int = 0
    refused: int = 0
    cuts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    retransmits: int = 0
    """Pieces held back one retransmission timeout by an emulated packet loss."""


class _Pipe:
    """One direction of one connection: read, pay the bucket, delay, write (order preserved)."""

    def __init__(self, proxy: LinkProxy, reader, writer, up: bool) -> None:
        self.proxy = proxy
        self.reader = reader
        self.writer = writer
        self.up = up
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def pump(self) -> None:
        """Reader and delayed writer; returns when either side closes."""
        tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                    await t

    async def _read(self) -> None:
        cfg = self.proxy.config
        last_due = 0.0
        while True:
            bucket = self.proxy.bucket(self.up)
            size = cfg.read_chunk_bytes
            if bucket is not None:  # about 10 ms of data per piece keeps slow links smooth
                size = max(1024, min(size, int(bucket.rate * 0.01)))
            data = await self.reader.read(size)
            self.proxy.last_activity = time.perf_counter()
            if not data:
                await self.queue.put((last_due, b""))
                await asyncio.Event().wait()  # let the writer flush then finish the pipe
            if bucket is not None:
                await bucket.take(len(data))
            delay = self.proxy.delay_s() + await self.proxy.loss_delay_s(len(data), self.up)
            last_due = max(last_due, self.proxy.clock.monotonic() + delay)
            await self.queue.put((last_due, data))

    async def _write(self) -> None:
        while True:
            due, data = await self.queue.get()
            wait = due - self.proxy.clock.monotonic()
            if wait > 0:
                await self.proxy.clock.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    self.writer.write_eof()
                return
            self.writer.write(data)
            self.proxy.last_activity = time.perf_counter()
            await self.writer.drain()
            if self.up:
                self.proxy.stats.bytes_up += len(data)
            else:
                self.proxy.stats.bytes_down += len(data)


class LinkProxy:
    """Listen on ``listen_host:port`` (0 = ephemeral) and forward to ``target``, emulating ``config``."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        config: LinkConfig | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target = (target_host, target_port)
        self.config = config or LinkConfig()
        self.listen = (listen_host, listen_port)
        self.port = 0
        self.stats = LinkStats()
        self.clock = clocks.current()
        self.last_activity = 0.0
        """``time.perf_counter()`` when this proxy last moved bytes (the simulator's quiet check)."""
        self._rng = random.Random(self.config.seed)
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._started = 0.0
        self._chaos: asyncio.Task[None] | None = None
        self._forced_down = False
        c = self.config
        self._base = LinkState(c.up_mbps, c.down_mbps, c.latency_ms, c.jitter_ms, c.loss)
        self._trace = LinkTrace.load(c.trace, c.trace_loop) if c.trace is not None else None
        self.state = self._base
        self._buckets: dict[bool, TokenBucket | None] = {True: None, False: None}
        self._set_state(self._trace.state(0.0, self._base) if self._trace else self._base)

    def _set_state(self, state: LinkState) -> None:
        """Apply new conditions: bucket rates follow, a bucket appears or goes with a limit."""
        self.state = state
        for up, mbps in ((True, state.up_mbps), (False, state.down_mbps)):
            rate = LinkConfig.mbps_to_bytes_per_s(mbps)
            bucket = self._buckets[up]
            if rate is None:
                self._buckets[up] = None
            elif bucket is None:
                self._buckets[up] = TokenBucket(rate)
            elif bucket.rate != rate:
                bucket.set_rate(rate)

    def bucket(self, up: bool) -> TokenBucket | None:
        """The rate limiter of one direction now (``None``: unlimited)."""
        return self._buckets[up]

    async def loss_delay_s(self, nbytes: int, up: bool) -> float:
        """Extra delay of a piece of ``nbytes``: one retransmission timeout if any of its packets is lost
        (the resent packet also pays the bucket)."""
        loss = self.state.loss
        if loss <= 0:
            return 0.0
        packets = max(1, math.ceil(nbytes / self.config.mtu_bytes))
        if self._rng.random() >= 1.0 - (1.0 - loss) ** packets:
            return 0.0
        self.stats.retransmits += 1
        bucket = self.bucket(up)
        if bucket is not None:
            await bucket.take(min(nbytes, self.config.mtu_bytes))
        s = self.state
        return max(self.config.min_rto_ms, 2 * (s.latency_ms + s.jitter_ms)) / 1000.0

    @property
    def address(self) -> str:
        """``host:port`` devices should dial."""
        return f"{self.listen[0]}:{self.port}"

    def retarget(self, host: str, port: int) -> None:
        """Send new connections to another upstream (e.g. a restarted gateway on a new port)."""
        self.target = (host, port)

    def delay_s(self) -> float:
        """One-way delay for the next piece of data."""
        s = self.state
        jitter = self._rng.uniform(-s.jitter_ms, s.jitter_ms) if s.jitter_ms else 0.0
        return max(0.0, s.latency_ms + jitter) / 1000.0

    def set_epoch(self, epoch: float) -> None:
        """Move time 0 of outages, cuts and traces to ``epoch`` (a ``clock.monotonic()`` value)."""
        self._started = epoch

    def elapsed_s(self) -> float:
        """Seconds since start."""
        return self.clock.monotonic() - self._started

    def is_down(self) -> bool:
        """True during a configured outage or after ``set_down(True)``."""
        if self._forced_down:
            return True
        t = self.elapsed_s()
        return any(o.start_s <= t < o.start_s + o.duration_s for o in self.config.outages)

    async def start(self, epoch: float | None = None) -> int:
        """Start listening; returns the bound port. ``epoch`` (a ``clock.monotonic()`` value) is the time 0 of
        outages, cuts and traces (default: now), so a fleet's links share one clock."""
        self._started = self.clock.monotonic() if epoch is None else epoch
        self._server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1])
        self.port = self._server.sockets[0].getsockname()[1]
        c = self.config
        if c.cut_probability_per_s > 0 or c.cut_schedule_s or c.outages or self._trace is not None:
            self._chaos = asyncio.create_task(self._chaos_loop())
        return self.port

    async def _chaos_loop(self) -> None:
        c = self.config
        schedule = list(c.cut_schedule_s)
        tick = 0.1
        while True:
            await self.clock.sleep(tick)
            t = self.elapsed_s()
            if self._trace is not None:
                self._set_state(self._trace.state(t, self._base))
            due = False
            while schedule and schedule[0] <= t:
                schedule.pop(0)
                due = True
            if c.cut_probability_per_s and self._rng.random() < c.cut_probability_per_s * tick:
                due = True
            if due or self.is_down():
                self.cut_all()

    def cut_all(self) -> int:
        """Abort every open connection (like a dropped radio link); returns how many were cut."""
        n = 0
        for w in list(self._writers):
            transport = w.transport
            if not transport.is_closing():
                transport.abort()
                n += 1
        if n:
            self.stats.cuts += 1
            log.info("cut %d connections at %.2fs", n, self.elapsed_s())
        return n

    def set_down(self, down: bool) -> None:
        """Force an outage on (cutting open connections) or off."""
        self._forced_down = down
        if down:
            self.cut_all()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self.is_down():
            self.stats.refused += 1
            c_writer.transport.abort()
            return
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.stats.refused += 1
            c_writer.transport.abort()
            return
        self.stats.connections += 1
        self._conns.add(task)
        self._writers.update((c_writer, s_writer))
        try:
            up = _Pipe(self, c_reader, s_writer, up=True)
            down = _Pipe(self, s_reader, c_writer, up=False)
            await asyncio.gather(up.pump(), down.pump())
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # a cut or a stop ends the connection; nothing to report
        finally:
            for w in (c_writer, s_writer):
                self._writers.discard(w)
                w.transport.abort()
            self._conns.discard(task)

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        if self._chaos is not None:
            self._chaos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._chaos
        if self._server is not None:
            self._server.close()
        self.cut_all()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2.0)
        for t in list(self._conns):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> LinkProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
