"""kill -9 of a real `tandem-device run` process during an upload and on either side of an update's HEAD swap,
then restart: it serves the version it held, no sample it queued is lost, none is stored twice, the outbox drains."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from agent_support import QUESTIONS, agent_config, cloud_student, image_array, micro_zoo
from PIL import Image
from transport_support import REPO_ROOT, running_gateway

from cloud.akd import adapter_state
from cloud.dwc import CloudMirror, DWCConfig, compress
from common.delta_codec import state_digest
from common.faults import fault_env
from device.transport.client import GatewayClient
from protocol.tandem.v1 import agent_pb2, agent_pb2_grpc


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return micro_zoo(tmp_path_factory.mktemp("zoo"))


class AgentProcess:
    """`python -m device.cli run --config ...` with NOTIFY_SOCKET pointing at a socket this test reads."""

    def __init__(self, config_path: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.env = env or {}
        self.sock_path = workdir / "notify.sock"
        self.log = workdir / "agent.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 240.0) -> None:  # a cold start on two loaded cores
        self.ready_message = ""
        self.sock_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.sock_path))
        sock.setblocking(False)
        env = {**os.environ, "NOTIFY_SOCKET": str(self.sock_path), "PYTHONPATH": str(REPO_ROOT), **self.env}
        env.setdefault("OMP_NUM_THREADS", "1")
        with open(self.log, "a") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "device.cli", "run", "--config", str(self.config_path),
                cwd=REPO_ROOT, env=env, stdout=log, stderr=log,
            )  # fmt: skip
        loop = asyncio.get_running_loop()

        async def ready() -> None:
            while not self.ready_message.startswith("READY=1"):
                self.ready_message = (await loop.sock_recv(sock, 4096)).decode()

        try:
            await asyncio.wait_for(ready(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"agent not ready: {self.log.read_text()[-2000:]}") from None
        finally:
            sock.close()

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.returncode is None, self.log.read_text()[-2000:]
        os.kill(self.proc.pid, signal.SIGKILL)

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def terminate(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 15)
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


async def _until(predicate, timeout: float = 30.0, what: str = "condition", step: float = 0.01) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(step)


def _outbox(state: Path) -> tuple[int, int]:
    """(pending samples, highest seq ever assigned) read from the agent's outbox database."""
    db = state / "outbox.db"
    if not db.exists():
        return 0, 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        try:
            (pending,) = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        except sqlite3.OperationalError:
            return 0, 0
    return int(pending), int(row[0]) if row else 0


async def _setup(tmp_path: Path, zoo, address: str, images: int, **overrides) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(images):
        Image.fromarray(image_array(i)).save(inbox / f"{i:03d}.png")
    cfg = agent_config(
        tmp_path / "dev",
        zoo.device,
        address,
        **{
            "sources.directory": {"path": str(inbox), "questions": QUESTIONS, "interval_s": 0.1},
            "transport.batch_max_samples": 2,
            **overrides,
        },
    )
    client = GatewayClient(cfg.transport)
    (await client.register()).save(cfg.state_dir)
    await client.close()
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


async def test_kill9_during_upload_loses_nothing_and_stores_nothing_twice(zoo, tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        config = await _setup(tmp_path, zoo, gw.address, images=30)
        state = tmp_path / "dev"
        agent = AgentProcess(config, tmp_path)
        await agent.start()
        try:
            await _until(lambda: gw.samples.count("dev-1") > 0 and _outbox(state)[0] > 0, what="an upload under way")
            agent.kill9()
            assert await agent.wait() == -signal.SIGKILL
            pending, queued = _outbox(state)
            stored_at_kill = gw.samples.count("dev-1")
            assert pending > 0 and stored_at_kill > 0  # killed with samples on both sides of the link
            await agent.start()
            await _until(
                lambda: _outbox(state)[0] == 0 and gw.samples.count("dev-1") == _outbox(state)[1],
                timeout=60,
                what="the outbox to drain",
            )
        finally:
            await agent.terminate()
        seqs = [s.seq for s in gw.samples.iter_samples("dev-1")]
    assert sorted(seqs) == list(range(1, max(seqs) + 1))  # every queued sample arrived
    assert len(seqs) == len(set(seqs)) and max(seqs) >= queued  # none stored twice


async def test_kill9_either_side_of_the_head_swap_serves_a_consistent_version_after_restart(zoo, tmp_path):
    """Two real kills at test fault points (common/faults.py) of the update's apply: after the new version is
    written but before HEAD names it (the agent restarts on the old version and fetches the update again), and
    right after HEAD names it (the agent restarts on the new version, which its update state did not record)."""
    fault = tmp_path / "fault"
    async with running_gateway(tmp_path / "cloud") as gw:
        config = await _setup(tmp_path, zoo, gw.address, images=0, **{"api.listen": "127.0.0.1:0"})
        student, _ = cloud_student(zoo.device)
        mirror = CloudMirror(adapter_state(student))
        digests = {"v0": state_digest(mirror.state)}
        state = tmp_path / "dev"
        agent = AgentProcess(config, tmp_path, env=fault_env(fault))
        await agent.start()
        torch.manual_seed(0)
        try:
            for n, point, held_after_kill in ((1, "agent.before_head_swap", "v0"), (2, "agent.after_head_swap", "v2")):
                base, target = f"v{n - 1}", f"v{n}"
                fault.write_text(point)  # armed once the agent runs (its first start stores v0 through the same code)
                update = compress(
                    mirror, {k: v + 0.05 * torch.randn_like(v) for k, v in mirror.state.items()}, DWCConfig()
                )
                mirror.commit(update)
                digests[target] = state_digest(mirror.state)
                gw.publish("dev-1", base, target, update.payload, dict(update.header.metadata))
                assert await asyncio.wait_for(agent.wait(), 120) == -signal.SIGKILL
                assert Path(f"{fault}.fired").read_text() == point and not fault.exists()
                assert _head_version(state) == held_after_kill
                assert {base, target} <= _versions_on_disk(state)  # the new version was complete either way
                assert _fetcher_version(state) == base  # the update state still names the old version
                await agent.start()
                assert agent.ready_message.endswith(f"serving adapter {held_after_kill}")  # exactly what HEAD held
                for _ in range(3000):  # after the first kill the restarted agent fetches the update again
                    status = await _status(state)
                    if status.adapter_version == target:
                        break
                    await asyncio.sleep(0.02)
                assert status.adapter_version == target
                assert status.adapter_digest == digests[target] == state_digest(mirror.state)
                assert _fetcher_version(state) == target
        finally:
            await agent.terminate()


def _versions_on_disk(state: Path) -> set[str]:
    versions = (state / "adapters" / "versions").glob("*/tandem.json")
    return {json.loads(p.read_text())["version"] for p in versions}


def _fetcher_version(state: Path) -> str:
    """The version the agent's update state records (the initial v0 until it first saves)."""
    path = state / "updates" / "state.json"
    return json.loads(path.read_text())["current_version"] if path.is_file() else "v0"


def _head_version(state: Path) -> str:
    head = json.loads((state / "adapters" / "HEAD.json").read_text())
    return json.loads((state / "adapters" / "versions" / head["current"] / "tandem.json").read_text())["version"]


async def _status(state: Path) -> agent_pb2.AgentStatusResponse:
    address = (state / "agent.address").read_text().strip()
    async with grpc.aio.insecure_channel(address) as channel:
        return await agent_pb2_grpc.DeviceAgentStub(channel).Status(agent_pb2.AgentStatusRequest(), timeout=10)
