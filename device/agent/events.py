"""The agent's public event hook: what a watcher (the fleet simulator, a test, an operator's plug-in) may observe.

Subscribe a :class:`AgentListener` with ``DeviceAgent.subscribe``; override the methods you need. Each is called
on the thread named in its docstring, must return quickly and should not raise (an exception is logged and the
agent goes on).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("tandem.device.events")


class AgentListener:
    """No-op base: the agent calls these as things happen."""

    def answered(self, requests: Sequence[Any], answers: Sequence[Any]) -> None:
        """A batch was answered (worker thread): the ``Request`` objects (with their frames) and ``Answer`` s."""

    def sample_queued(self, seq: int, nbytes: int, metadata: dict[str, str]) -> None:
        """UTS chose a sample and the outbox holds it durably under ``seq`` (outbox writer thread)."""

    def uploaded(self, acked_seq: int) -> None:
        """The cloud acked every sample up to ``acked_seq`` (event loop)."""

    def applied(self, version: str, update_id: int) -> None:
        """Update ``update_id`` was applied and the agent now serves ``version`` (event loop)."""

    def rolled_back(self, from_version: str, to_version: str, reason: str) -> None:
        """The guard rolled ``from_version`` back; the agent serves ``to_version`` again (event loop)."""


class Listeners(AgentListener):
    """Fans each event out to every subscriber; one failing subscriber never stops the others or the agent."""

    def __init__(self) -> None:
        self._subscribers: list[AgentListener] = []

    def add(self, listener: AgentListener) -> None:
        self._subscribers.append(listener)

    def _emit(self, name: str, *args: Any) -> None:
        for s in self._subscribers:
            try:
                getattr(s, name)(*args)
            except Exception:
                log.exception("agent listener %s.%s failed", type(s).__name__, name)

    def answered(self, requests, answers) -> None:
        self._emit("answered", requests, answers)

    def sample_queued(self, seq, nbytes, metadata) -> None:
        self._emit("sample_queued", seq, nbytes, metadata)

    def uploaded(self, acked_seq) -> None:
        self._emit("uploaded", acked_seq)

    def applied(self, version, update_id) -> None:
        self._emit("applied", version, update_id)

    def rolled_back(self, from_version, to_version, reason) -> None:
        self._emit("rolled_back", from_version, to_version, reason)
