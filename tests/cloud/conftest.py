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
def ray_fault_file(tmp_path_factory):
    """The fault file (common/faults.py) every worker of the session's Ray honours: a test arms a point by writing
    it and must remove it when done."""
    return tmp_path_factory.mktemp("ray-faults") / "fault"


@pytest.fixture(scope="session")
def local_ray(ray_fault_file):
    """A local Ray with two CPUs for the whole session, shut down at its end (never ``ray stop``)."""
    import ray

    from common.faults import fault_env

    env = {"env_vars": fault_env(ray_fault_file)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
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
