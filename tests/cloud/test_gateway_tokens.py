"""The gateway's token cache: hits cost no registry call, and a revoked, rotated or moved token is never served
from it (this process at once; another process's change at once on SQLite, on its NOTIFY on PostgreSQL)."""

from __future__ import annotations

import asyncio
import time

import pytest
from store_support import make_backend, pg_dsn, s3_bucket  # noqa: F401 (fixtures)

from cloud.config import GatewayConfig
from cloud.device_tokens import TokenCache
from cloud.stores import open_device_registry


@pytest.fixture(params=["sqlite", "postgres-dir"])
def registries(request, tmp_path):
    """(the gateway's registry, another process's view of the same database)."""
    backend = make_backend(request.param, tmp_path / "state", request)
    cfg = GatewayConfig(**backend.fields("a"))
    mine, other = open_device_registry(cfg, cfg.data_dir), open_device_registry(cfg, cfg.data_dir)
    yield mine, other, request.param
    mine.close()
    other.close()


class _Counting:
    """The registry, counting ``authenticate`` calls (what a cache hit saves)."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.calls = 0

    def authenticate(self, token):
        self.calls += 1
        return self.registry.authenticate(token)

    def watch_tokens(self, on_change):
        return self.registry.watch_tokens(on_change)


async def _refused_within(cache: TokenCache, token: str, seconds: float) -> None:
    """``token`` stops authenticating at once (``seconds`` 0) or within ``seconds``."""
    start = time.monotonic()
    while await cache.authenticate(token) is not None:
        assert time.monotonic() - start < seconds, "a revoked token was still served"
        await asyncio.sleep(0.005)


async def test_hits_skip_the_registry_and_heartbeats_keep_them(registries):
    mine, other, _ = registries
    _, token = mine.register("dev-1", cohort="c", model_family="m", model_version="1", capabilities={})
    counting = _Counting(mine)
    cache = TokenCache(counting)  # type: ignore[arg-type]
    try:
        for _ in range(5):
            assert (await cache.authenticate(token)).device_id == "dev-1"
        assert counting.calls == 1
        other.heartbeat("dev-1", status="ok", applied_version="v1", metrics={})  # not a token change
        other.touch("dev-1")
        assert (await cache.authenticate(token)).device_id == "dev-1" and counting.calls == 1
        assert await cache.authenticate("forged") is None and await cache.authenticate("forged") is None
        assert counting.calls == 3  # unknown tokens are never cached
    finally:
        cache.close()


async def test_revoke_in_this_process_is_refused_at_once(registries):
    mine, _, _ = registries
    cache = TokenCache(mine)
    try:
        _, token = mine.register("dev-1", cohort="c", model_family="m", model_version="1", capabilities={})
        assert await cache.authenticate(token) is not None
        assert mine.revoke("dev-1")
        assert await cache.authenticate(token) is None
    finally:
        cache.close()


async def test_changes_in_another_process_empty_the_cache(registries):
    mine, other, backend = registries
    cache = TokenCache(mine)
    # SQLite: seen on the next lookup; PostgreSQL: when the NOTIFY arrives (milliseconds)
    limit = 0.0 if backend == "sqlite" else 2.0
    try:
        _, old = mine.register("dev-1", cohort="c", model_family="m", model_version="1", capabilities={})
        _, token2 = mine.register("dev-2", cohort="c", model_family="m", model_version="1", capabilities={})
        assert (await cache.authenticate(old)).cohort == "c" and await cache.authenticate(token2) is not None
        _, new = other.register("dev-1", cohort="c", model_family="m", model_version="1", capabilities={})
        await _refused_within(cache, old, limit)
        assert (await cache.authenticate(new)).device_id == "dev-1"
        assert other.set_cohort("dev-2", "d")
        start = time.monotonic()
        while (await cache.authenticate(token2)).cohort != "d":
            assert time.monotonic() - start < limit, "a moved device kept its old cohort"
            await asyncio.sleep(0.005)
        assert other.revoke("dev-2")
        await _refused_within(cache, token2, limit)
    finally:
        cache.close()


async def test_a_revoke_by_the_operator_cli_is_refused_on_the_next_call(tmp_path):
    """One SQLite gateway serving; ``tandem-cloud devices revoke`` opens the same file in another process (here:
    another registry) and revokes: the very next call with the old token is refused."""
    import grpc
    from transport_support import registered_client, running_gateway

    from cloud.devices import DeviceRegistry

    async with running_gateway(tmp_path / "cloud") as gw, registered_client(tmp_path / "d", gw.address) as client:
        for _ in range(3):  # served from the cache now
            assert (await client.heartbeat("ok", "v0", {}, 0)).server_unix_ms > 0
        operator = DeviceRegistry(tmp_path / "cloud" / "devices.db")
        try:
            assert operator.revoke("dev-1")
        finally:
            operator.close()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.heartbeat("ok", "v0", {}, 0)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
