"""The agent's event hook: every subscriber hears every event, and one that fails stops neither the others nor
the agent."""

from __future__ import annotations

from device.agent.events import AgentListener, Listeners


class _Recorder(AgentListener):
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def sample_queued(self, seq, nbytes, metadata) -> None:
        self.seen.append(("queued", seq, nbytes))

    def uploaded(self, acked_seq) -> None:
        self.seen.append(("acked", acked_seq))

    def applied(self, version, update_id) -> None:
        self.seen.append(("applied", version, update_id))

    def rolled_back(self, from_version, to_version, reason) -> None:
        self.seen.append(("rollback", from_version, to_version))


class _Broken(AgentListener):
    def uploaded(self, acked_seq) -> None:
        raise RuntimeError("listener bug")


def test_every_subscriber_hears_every_event_even_beside_a_broken_one(caplog):
    listeners, first, second = Listeners(), _Recorder(), _Recorder()
    for s in (first, _Broken(), second):
        listeners.add(s)
    listeners.sample_queued(3, 120, {})
    listeners.uploaded(3)
    listeners.applied("v1", 7)
    listeners.rolled_back("v1", "v0", "less confident")
    listeners.answered([], [])  # the base class ignores what it does not override
    expected = [("queued", 3, 120), ("acked", 3), ("applied", "v1", 7), ("rollback", "v1", "v0")]
    assert first.seen == expected and second.seen == expected
    assert "listener bug" in caplog.text
