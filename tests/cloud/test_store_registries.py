"""The device registry and the update registry behave the same on SQLite and PostgreSQL; on PostgreSQL
they are shared by every process (a device registered through one gateway is known to all)."""

from __future__ import annotations

import threading
import time

import pytest
from store_support import make_backend, pg_dsn, s3_bucket  # noqa: F401 (fixtures)

from cloud.config import GatewayConfig
from cloud.devices import DeviceStateError
from cloud.stores import open_device_registry, open_update_registry
from cloud.updates.publishing import PublishError
from common.signing import generate_private_key
from protocol.updates import UpdateHeader


@pytest.fixture(params=["sqlite", "postgres-dir", "postgres-s3"])
def backend(request, tmp_path):
    return make_backend(request.param, tmp_path / "state", request)


def _cfg(backend, gateway="a") -> GatewayConfig:
    return GatewayConfig(**backend.fields(gateway))


def test_device_registry(backend):
    cfg = _cfg(backend)
    reg = open_device_registry(cfg, cfg.data_dir)
    other = open_device_registry(cfg, cfg.data_dir)  # another process's view (SQLite: same file)
    try:
        record, token = reg.register(
            "dev-1", cohort="c", model_family="llava", model_version="1", capabilities={"memory_bytes": 8}
        )
        assert (record.device_id, record.cohort, record.capabilities, record.revoked) == (
            "dev-1",
            "c",
            {"memory_bytes": 8},
            False,
        )
        assert other.authenticate(token).device_id == "dev-1"
        assert other.authenticate("forged") is None and other.get("nobody") is None
        reg.heartbeat("dev-1", status="ok", applied_version="v3", metrics={"acc": 0.5})
        seen = other.get("dev-1")
        assert (seen.status, seen.applied_version, seen.metrics) == ("ok", "v3", {"acc": 0.5})
        assert seen.last_seen_unix_ms >= record.registered_unix_ms
        other.touch("dev-1", "v4")
        assert reg.get("dev-1").applied_version == "v4"
        assert reg.revoke("dev-1") and not reg.revoke("nobody")
        assert other.authenticate(token) is None and other.get("dev-1").state == "revoked"
        with pytest.raises(DeviceStateError, match="revoked"):  # only the operator re-admits it
            other.register("dev-1", cohort="d", model_family="llava", model_version="2", capabilities={})
        code = reg.provision("dev-1", "d")
        assert other.get("dev-1").state == "provisioned"
        assert other.check_enrollment_code("dev-1", code) and not other.check_enrollment_code("dev-1", "guess")
        again, token2 = other.register("dev-1", cohort="d", model_family="llava", model_version="2", capabilities={})
        assert token2 != token and again.state == "active" and again.cohort == "d"
        assert not reg.check_enrollment_code("dev-1", code)  # one-time
        with pytest.raises(DeviceStateError, match="active"):
            reg.provision("dev-1", "d")
        assert other.authenticate(token) is None and other.authenticate(token2).model_version == "2"
        assert reg.set_cohort("dev-1", "e") and other.get("dev-1").cohort == "e" and not reg.set_cohort("x", "e")
        reg.register("dev-0", cohort="", model_family="f", model_version="", capabilities={})
        assert [d.device_id for d in other.list()] == ["dev-0", "dev-1"]
        reg.record_rollback("dev-1", "v4", "v3", "accuracy fell")
        other.record_rollback("dev-0", "v2", "v1", "")
        events = reg.rollbacks()
        assert [(e.device_id, e.from_version, e.to_version, e.reason) for e in events] == [
            ("dev-1", "v4", "v3", "accuracy fell"),
            ("dev-0", "v2", "v1", ""),
        ]
        assert [e.device_id for e in other.rollbacks(after_id=events[0].event_id)] == ["dev-0"]
    finally:
        reg.close()
        other.close()


def test_update_registry(backend):
    cfg = _cfg(backend)
    key = generate_private_key()
    reg = open_update_registry(cfg, cfg.data_dir, key)
    other = open_update_registry(cfg, cfg.data_dir, key)
    try:
        payload = bytes(range(256)) * 300
        one = reg.publish("dev-1", "v0", "v1", payload, {"bits": 4})
        two = reg.publish_cohort("jetsons", "v1", "v2", b"cohort", None)
        three = other.publish("dev-2", "v0", "v1", payload)  # same bytes: one blob serves both
        assert one.update_id < two.update_id < three.update_id == other.latest_id() == reg.latest_id()
        got = other.get(one.update_id)
        assert got == one and got.metadata == {"bits": "4"}
        assert UpdateHeader.verify(got.header, key.public_key(), got.signature)
        assert other.read_payload(one.update_id, 1000, 500) == payload[1000:1500]
        assert other.read_payload(three.update_id, 0, len(payload) + 10) == payload
        assert [r.update_id for r in other.for_device("dev-1", "jetsons")] == [one.update_id, two.update_id]
        assert [r.update_id for r in other.for_device("dev-1", "jetsons", after_id=one.update_id)] == [two.update_id]
        assert [r.update_id for r in other.for_device("dev-3", "")] == []
        assert [r.update_id for r in other.list(device_id="dev-2")] == [three.update_id]
        assert [r.update_id for r in other.list(cohort="jetsons")] == [two.update_id]
        assert other.get(9999) is None
        with pytest.raises(KeyError):
            other.read_payload(9999, 0, 1)
        for bad in (("", "v0", "v1"), ("d", "v0", "v0"), ("d", "bad version", "v1")):
            with pytest.raises(PublishError):
                reg.publish(*bad, b"x")
        with pytest.raises(PublishError):
            reg.publish_cohort("", "v0", "v1", b"x")
    finally:
        reg.close()
        other.close()


def test_concurrent_publishers_never_hide_an_update_from_a_cursor(tmp_path, request):
    """Ids commit in id order, so a watcher that moved its cursor past n never misses an id below n."""
    backend = make_backend("postgres-dir", tmp_path / "state", request)
    cfg = _cfg(backend)
    key = generate_private_key()
    publishers = [open_update_registry(cfg, cfg.data_dir, key) for _ in range(3)]
    watcher = open_update_registry(cfg, cfg.data_dir, key)
    per, seen, done = 15, [], threading.Event()

    def publish(reg, n) -> None:
        for i in range(per):
            reg.publish("dev-1", f"p{n}.{i}", f"p{n}.{i}x", f"{n}-{i}".encode())

    def watch() -> None:
        cursor = 0
        while True:
            finished = done.is_set()  # read once more after the last publish committed
            for r in watcher.for_device("dev-1", "", after_id=cursor):
                seen.append(r.update_id)
                cursor = r.update_id
            if finished:
                return
            time.sleep(0.001)

    w = threading.Thread(target=watch)
    w.start()
    threads = [threading.Thread(target=publish, args=(r, n)) for n, r in enumerate(publishers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    w.join(30)
    all_ids = [r.update_id for r in watcher.list()]
    for r in [*publishers, watcher]:
        r.close()
    assert len(all_ids) == per * len(publishers)
    assert seen == all_ids  # every id, in order, none skipped by the moving cursor
