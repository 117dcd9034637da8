"""The composer of ``tandem-device run``: a ``DeviceAgent`` and its local gRPC API, started and stopped together.

The agent core knows nothing of its front end; the API depends only on ``device.agent.api.AnswerBackend``.
The address the API bound is written to ``<state_dir>/agent.address`` for ``tandem-device status`` and ``ask``.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from device.agent.agent import DeviceAgent
from device.agent.api import start_api

log = logging.getLogger("tandem.device.service")
ADDRESS_FILE = "agent.address"
"""Where a running agent's local API address is written (port 0 picks one)."""


class AgentService:
    """A DeviceAgent served on ``listen`` (default ``config.api.listen``; empty: no API)."""

    def __init__(self, agent: DeviceAgent, listen: str | None = None) -> None:
        self.agent = agent
        self.listen = agent.config.api.listen if listen is None else listen
        self.address: str | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Start the agent, then its API (so no request arrives before the batcher runs), then tell systemd the
        agent is ready: whoever waits for READY finds the new address written."""
        (self.agent.state_dir / ADDRESS_FILE).unlink(missing_ok=True)  # a killed predecessor's address is stale
        await self.agent.start(announce=False)
        try:
            await self._start_api()
        except BaseException:
            await self.agent.stop()
            raise
        self.agent.announce_ready()

    async def _start_api(self) -> None:
        if not self.listen:
            return
        self._server, self.address = await start_api(self.agent, self.listen)
        address_file = self.agent.state_dir / ADDRESS_FILE
        address_file.with_suffix(".tmp").write_text(self.address + "\n")
        address_file.with_suffix(".tmp").replace(address_file)

    async def stop(self) -> None:
        """Stop the API (in-flight calls get a second), then the agent."""
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None
        await self.agent.stop()

    async def run_until(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set or one of the agent's loops fails for good, then stop."""
        await self.start()
        try:
            await self.agent.wait_until(stop)
        finally:
            await self.stop()
