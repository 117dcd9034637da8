"""Fixtures of the cloud tests: the micro zoo (built once per session), one local Ray per session, and an event
loop for tests that drive grpc.aio from synchronous code."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """Teacher and device directories of the micro zoo (built in seconds, cached for the session)."""
    from sim.zoo.build import ensure_zoo
    from sim.zoo.recipe import micro_recipe

    return ensure_zoo(micro_recipe(), home=tmp_path_factory.mktemp("zoo"), progress=False)


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray with two CPUs for the whole session, shut down at its end (never ``ray stop``)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def loop():
    """A fresh event loop, set as current (grpc.aio looks the loop up outside coroutines too)."""
    lp = asyncio.new_event_loop()
    asyncio.set_event_loop(lp)
    yield lp
    asyncio.set_event_loop(None)
    lp.close()
