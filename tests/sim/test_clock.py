"""Virtual time: sleepers wake in order and only when the harness advances; the cloud's view through the shared
file agrees; the process clock defaults to the wall clock and can be swapped."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import threading

from common import clock as clocks
from common.clock import SharedClock, SharedClockFile
from sim.clock import VirtualClock


def test_the_process_clock_is_the_wall_clock_until_replaced(tmp_path):
    assert clocks.current() is clocks.WALL
    virtual = VirtualClock(tmp_path / "clock.bin")
    previous = clocks.install(virtual)
    try:
        assert clocks.current() is virtual and previous is clocks.WALL
    finally:
        clocks.install(previous)
    assert clocks.current() is clocks.WALL


def test_sleepers_wake_in_virtual_order_only_when_advanced():
    clock = VirtualClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, s: float) -> None:
        await clock.sleep(s)
        woke.append((name, clock.monotonic()))

    async def main() -> None:
        tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 2.0), ("a", 1.0), ("c", 3.0))]
        await asyncio.sleep(0.05)
        assert woke == [] and clock.next_due() == 1.0  # no wall time makes virtual time pass
        clock.advance_to(1.5)
        await asyncio.sleep(0)
        assert [n for n, _ in woke] == ["a"]
        clock.advance_to(10.0)
        await asyncio.gather(*tasks)
        assert [n for n, _ in woke] == ["a", "b", "c"]
        assert clock.next_due() is None

    asyncio.run(main())


def test_wait_returns_on_the_event_or_the_virtual_timeout():
    clock = VirtualClock()

    async def main() -> None:
        event = asyncio.Event()
        waiting = asyncio.create_task(clock.wait(event, 5.0))
        await asyncio.sleep(0.02)
        clock.advance_to(4.9)
        await asyncio.sleep(0.02)
        assert not waiting.done()
        clock.advance_to(5.0)
        assert await waiting is False
        event.set()
        assert await clock.wait(event, 5.0) is True

    asyncio.run(main())


def test_a_thread_blocks_until_virtual_time_passes():
    clock = VirtualClock()
    done = threading.Event()
    t = threading.Thread(target=lambda: (clock.sleep_blocking(2.0), done.set()))
    t.start()
    assert not done.wait(0.1)
    clock.advance_to(1.0)
    assert not done.wait(0.1)
    clock.advance_to(2.0)
    assert done.wait(5)
    t.join()


def _cloud_side(path: str, out) -> None:
    c = SharedClock(path)
    tick = c.file.tick()
    c.file.ack(tick, 12.5)
    out.put((c.monotonic(), c.time() - c.file.epoch_unix(), tick))


def test_the_cloud_process_reads_the_same_time_and_acks_ticks(tmp_path):
    clock = VirtualClock(tmp_path / "clock.bin", epoch_unix=1_000.0)
    clock.advance_to(7.25)
    tick = clock.shared.request_tick()
    q = multiprocessing.get_context("spawn").Queue()
    p = multiprocessing.get_context("spawn").Process(target=_cloud_side, args=(str(tmp_path / "clock.bin"), q))
    p.start()
    now, since_epoch, seen = q.get(timeout=60)
    p.join(30)
    assert now == 7.25 and math.isclose(since_epoch, 7.25) and seen == tick
    assert clock.shared.acked() == (tick, 12.5)
    assert SharedClock(tmp_path / "clock.bin").time() == 1_007.25


def test_a_fresh_clock_file_has_no_barrier(tmp_path):
    f = SharedClockFile(tmp_path / "c.bin", create=True)
    assert f.acked() == (0, math.inf) and f.calls() == 0
