"""Agent parts on their own: config, adapter store, guard, sd_notify, batcher swaps, sources, logs."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading

import cv2
import numpy as np
import pytest
import torch
from agent_support import QUESTIONS, image_array, micro_zoo

from common.errors import ConfigError
from common.logs import JsonFormatter
from device.agent import AdapterState, AdapterStore, DeviceModel, DeviceStep, DirectorySource, Frame, RegressionGuard
from device.agent.batcher import MicroBatcher
from device.agent.config import load_agent_config, parse_assignments
from device.agent.sdnotify import SystemdNotifier
from device.agent.sources import CameraSource
from device.agent.store import AdapterStoreError
from device.sparse import SparseConfig


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    zoo = micro_zoo(tmp_path_factory.mktemp("zoo"))
    return DeviceModel.load(zoo.device, sparse=SparseConfig(budget=8))


# -- config ------------------------------------------------------------------------------------------------
def test_config_overrides_and_unknown_keys_named(tmp_path):
    cfg = load_agent_config(None, parse_assignments(["api.max_batch=4", "sparse.mode=rank", "uts.gate.budget=7"]))
    assert cfg.api.max_batch == 4 and cfg.sparse.mode == "rank" and cfg.uts.gate.budget == 7
    bad = tmp_path / "d.yaml"
    bad.write_text("api:\n  max_batchh: 4\n")
    with pytest.raises(ConfigError, match=r"api\.max_batchh"):
        load_agent_config(bad)
    with pytest.raises(ConfigError, match=r"guard\.window"):
        load_agent_config(None, {"guard.window": 0})
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_assignments(["no-equals-sign"])
    with pytest.raises(ConfigError, match="not a section"):
        load_agent_config(None, {"api.listen": "127.0.0.1:1", "api.listen.port": 1})
    assert load_agent_config(None, {"metrics.port": None}).metrics.port is None


# -- adapter store -----------------------------------------------------------------------------------------
def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(4, 8, generator=g), "a.lora_B.weight": torch.randn(8, 4, generator=g)}


def test_store_commit_rollback_restart_and_damage(tmp_path):
    store = AdapterStore(tmp_path / "adapters", {"r": 4, "peft_type": "LORA"})
    with pytest.raises(AdapterStoreError, match="no version"):
        store.current()
    store.commit(AdapterState("v0", _state(0)))
    store.commit(AdapterState("v1", _state(1)))
    again = AdapterStore(tmp_path / "adapters")
    assert again.current().version == "v1" and again.previous().version == "v0"
    assert again.current().digest() == AdapterState("v1", _state(1)).digest()
    back = again.rollback("worse")
    assert back.version == "v0" and again.pending_rollback().rolled_back_from == "v1"
    assert AdapterStore(tmp_path / "adapters").pending_rollback().reason == "worse"
    again.acknowledge_rollback()
    assert AdapterStore(tmp_path / "adapters").pending_rollback() is None
    with pytest.raises(AdapterStoreError, match="no previous"):
        again.rollback("again")
    assert len(list((tmp_path / "adapters" / "versions").iterdir())) == 1  # v1 collected after the rollback
    export = again.export_peft(tmp_path / "peft")
    assert json.loads((export / "adapter_config.json").read_text())["r"] == 4
    # a half-written version (killed before HEAD moved) is ignored and removed
    (tmp_path / "adapters" / "versions" / ".tmp-dead").mkdir()
    assert AdapterStore(tmp_path / "adapters").current().version == "v0"
    assert not (tmp_path / "adapters" / "versions" / ".tmp-dead").exists()
    weights = next((tmp_path / "adapters" / "versions").iterdir()) / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(AdapterStoreError, match="digest"):
        AdapterStore(tmp_path / "adapters").current()


# -- guard -------------------------------------------------------------------------------------------------
def test_guard_rolls_back_only_on_a_drop_beyond_the_margin():
    guard = RegressionGuard(window=4, margin=0.1)
    assert not guard.arm("v1")  # no baseline yet: nothing to compare, the swap is kept
    guard.observe([0.8] * 4, [0.2] * 4)
    assert guard.arm("v1")
    guard.observe([0.75] * 3, [0.3] * 3)
    assert guard.decision() is None
    guard.observe([0.75], [0.3])
    kept = guard.decision()
    assert kept is not None and not kept.rollback and kept.before == pytest.approx(0.8)
    assert guard.arm("v2")
    guard.observe([0.5] * 4, [0.9] * 4)
    bad = guard.decision()
    assert bad.rollback and "fell from 0.750 to 0.500" in bad.reason
    entropy = RegressionGuard(window=2, margin=0.1, metric="entropy")
    entropy.observe([0.5, 0.5], [0.2, 0.2])
    entropy.arm("v1")
    entropy.observe([0.5, 0.5], [0.5, 0.5])
    assert entropy.decision().rollback


# -- sd_notify ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_over_a_real_datagram_socket(tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"@tandem-test-{os.getpid()}-{abstract}" if abstract else str(tmp_path / "notify.sock")
    sock.bind("\0" + name[1:] if abstract else name)
    sock.settimeout(2)
    try:
        env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
        n = SystemdNotifier(env)
        assert n.enabled and n.watchdog_interval_s == 2.0
        assert n.ready("serving v0") and n.watchdog() and n.stopping()
        got = [sock.recv(4096).decode() for _ in range(3)]
    finally:
        sock.close()
    assert got == ["READY=1\nSTATUS=serving v0", "WATCHDOG=1", "STOPPING=1"]
    assert (
        not SystemdNotifier({}).ready()
        and SystemdNotifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    )


# -- batcher -----------------------------------------------------------------------------------------------
class GatedStep(DeviceStep):
    """A real DeviceStep whose batches wait for the test to let them run."""

    def __init__(self, model):
        super().__init__(model)
        self.entered = threading.Event()
        self.release = threading.Event()

    def run(self, frames):
        self.entered.set()
        self.release.wait(10)
        return super().run(frames)


def test_swap_waits_for_the_batch_in_flight(model):
    step = GatedStep(model)
    original = model.adapter
    batcher = MicroBatcher(step, max_batch=4, max_wait_s=0.0)
    batcher.start()
    try:
        first = batcher.submit(Frame(QUESTIONS[0], image=image_array(1)))
        assert step.entered.wait(5)
        new = AdapterState("v1", {k: v + 0.01 for k, v in original.state.items()})
        swapped = batcher.between_batches(lambda: step.swap(new))
        second = batcher.submit(Frame(QUESTIONS[1], image=image_array(2)))
        assert not swapped.done()
        step.release.set()
        assert first.result(10).version == "v0"
        swapped.result(10)
        assert second.result(10).version == "v1"
    finally:
        step.release.set()
        batcher.stop()
        model.install(original)
    assert batcher.swap_pauses_s and batcher.batches == 2


# -- sources -----------------------------------------------------------------------------------------------
def test_directory_source_answers_each_image_once(tmp_path):
    from PIL import Image

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    Image.fromarray(image_array(1)).save(inbox / "a.png")
    Image.fromarray(image_array(2)).save(inbox / "b.jpg")
    (inbox / "b.txt").write_text("how many shapes are there?\nis there a square?\n")
    (inbox / "broken.png").write_bytes(b"\x89PNG not really")
    src = DirectorySource(inbox, ["what colour is the circle?"], tmp_path / "state" / "dir.json")
    frames = src.poll()
    assert sorted(f.question for f in frames) == sorted([*QUESTIONS])
    assert src.poll() == []
    assert DirectorySource(inbox, ["q?"], tmp_path / "state" / "dir.json").poll() == []  # remembered
    with pytest.raises(ConfigError, match="not found"):
        DirectorySource(tmp_path / "missing", [], tmp_path / "s.json")


def test_camera_source_reads_frames_through_opencv(tmp_path):
    video = tmp_path / "cam.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 32))
    for i in range(3):
        writer.write(np.full((32, 32, 3), 60 * i, dtype=np.uint8))
    writer.release()
    cam = CameraSource(str(video), ["what colour is the circle?", "is there a square?"])
    polls = [cam.poll() for _ in range(4)]
    cam.close()
    assert [len(p) for p in polls] == [2, 2, 2, 0]
    assert polls[0][0].image.shape == (32, 32, 3) and polls[1][0].metadata["frame"] == "2"
    with pytest.raises(ConfigError, match="cannot open camera"):
        CameraSource(str(tmp_path / "none.avi"), ["q?"])


def test_json_logs_are_one_object_per_line():
    record = logging.makeLogRecord({"name": "tandem.x", "levelname": "INFO", "msg": "swapped %s", "args": ("v1",)})
    record.version = "v1"
    doc = json.loads(JsonFormatter().format(record))
    assert doc["msg"] == "swapped v1" and doc["level"] == "info" and doc["version"] == "v1"
