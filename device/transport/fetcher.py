"""Update fetcher: watches for versions, downloads resumably, verifies, then hands the payload to apply."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.codec import sha256_digest
from common.errors import TandemError
from common.signing import Ed25519PublicKey, load_public_key, load_public_key_pem
from device.transport.client import GatewayClient
from device.transport.config import DeviceClientConfig
from device.transport.identity import DeviceIdentity
from device.transport.retry import IncompleteTransfer, retrying
from protocol.tandem.v1 import gateway_pb2
from protocol.updates import header_from_proto

log = logging.getLogger("tandem.device.fetcher")

ApplyCallback = Callable[[bytes, gateway_pb2.UpdateHeader], "Awaitable[None] | None"]


class UpdateRejected(TandemError):
    """An update failed verification (digest, signature, base version, addressing) or its apply step."""


@dataclass(frozen=True)
class FetchOutcome:
    """What happened to one update."""

    update_id: int
    applied: bool
    reason: str
    version: str
    """The version the device holds afterwards."""


@dataclass
class FetcherStats:
    """Download counters (``fetch_offsets`` lists the offset each FetchUpdate call started at)."""

    fetch_offsets: list[int] = field(default_factory=list)
    bytes_fetched: int = 0
    applied: int = 0
    rejected: int = 0


class FetcherState:
    """Persisted in ``<state_dir>/updates/state.json``: current version and the fate of each update."""

    def __init__(self, directory: Path, initial_version: str) -> None:
        self.path = directory / "state.json"
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.current_version: str = data.get("current_version", initial_version)
        self.applied: list[int] = data.get("applied", [])
        self.rejected: dict[str, str] = data.get("rejected", {})

    def save(self) -> None:
        """Write atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        doc = {"current_version": self.current_version, "applied": self.applied, "rejected": self.rejected}
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


class UpdateFetcher:
    """Fetch, verify and apply updates addressed to this device; a rejected update leaves state unchanged."""

    def __init__(
        self,
        client: GatewayClient,
        identity: DeviceIdentity,
        config: DeviceClientConfig,
        apply: ApplyCallback,
        public_key: Ed25519PublicKey | None = None,
    ) -> None:
        self.client = client
        self.identity = identity
        self.config = config
        self.apply = apply
        if public_key is None:
            public_key = (
                load_public_key(config.cloud_public_key)
                if config.cloud_public_key
                else load_public_key_pem(identity.cloud_public_key_pem.encode(), "saved cloud key")
            )
        self.public_key = public_key
        self.directory = Path(config.state_dir) / "updates"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.state = FetcherState(self.directory, config.initial_version)
        self.known: dict[int, gateway_pb2.UpdateHeader] = {}
        self.cursor = 0
        self.stats = FetcherStats()
        self.outcomes: list[FetchOutcome] = []

    @property
    def current_version(self) -> str:
        """The weights version this device holds."""
        return self.state.current_version

    def _part(self, update_id: int) -> Path:
        return self.directory / f"{update_id}.part"

    async def download(self, update_id: int) -> tuple[gateway_pb2.UpdateHeader, bytes]:
        """Fetch an update's header and payload, resuming from the partial file after any cut."""
        part = self._part(update_id)
        c = self.config
        async for attempt in retrying(c.backoff_initial_s, c.backoff_max_s, c.backoff_jitter_s):
            with attempt:
                header, offset = await self._receive(update_id, part)
                if offset < header.payload.size:
                    raise IncompleteTransfer(f"update {update_id}: stream ended at {offset}")
        return header, part.read_bytes()

    async def _receive(self, update_id: int, part: Path) -> tuple[gateway_pb2.UpdateHeader, int]:
        """One FetchUpdate call from the partial file's length; returns the header and the reached offset."""
        offset = part.stat().st_size if part.exists() else 0
        self.stats.fetch_offsets.append(offset)
        header: gateway_pb2.UpdateHeader | None = None
        call = self.client.fetch(update_id, offset)
        try:
            with open(part, "ab") as fh:
                async for chunk in call:
                    if chunk.HasField("header"):
                        header = chunk.header
                        if header.update_id != update_id:
                            raise UpdateRejected(f"asked for update {update_id}, got {header.update_id}")
                        self._check_addressing(header)  # before spending the link on the payload
                    if header is None or chunk.offset != offset:
                        raise UpdateRejected(f"update {update_id}: stream out of order at offset {chunk.offset}")
                    if offset + len(chunk.data) > header.payload.size:
                        raise UpdateRejected(f"update {update_id}: more data than its declared size")
                    fh.write(chunk.data)
                    offset += len(chunk.data)
                    self.stats.bytes_fetched += len(chunk.data)
        finally:
            call.cancel()  # no-op when the stream finished; frees it after a rejection
        if header is None:
            raise IncompleteTransfer(f"update {update_id}: stream ended before its header")
        return header, offset

    def _check_addressing(self, header: gateway_pb2.UpdateHeader) -> None:
        ident = self.identity
        if not (header.device_id == ident.device_id or (header.cohort and header.cohort == ident.cohort)):
            raise UpdateRejected(f"update {header.update_id} is addressed to another device or cohort")
        if header.base_version != self.current_version:
            raise UpdateRejected(
                f"update {header.update_id} needs base version {header.base_version!r}, "
                f"device holds {self.current_version!r}"
            )

    def verify(self, header: gateway_pb2.UpdateHeader, payload: bytes) -> None:
        """Raise UpdateRejected unless addressing, base version, size, digest and signature all check out."""
        self._check_addressing(header)
        if len(payload) != header.payload.size:
            raise UpdateRejected(f"update {header.update_id}: size {len(payload)} != {header.payload.size}")
        if sha256_digest(payload) != header.payload.sha256:
            raise UpdateRejected(f"update {header.update_id}: sha256 digest mismatch")
        if not header_from_proto(header).verify(self.public_key, header.signature):
            raise UpdateRejected(f"update {header.update_id}: signature does not verify with the cloud key")

    async def fetch_and_apply(self, update_id: int) -> FetchOutcome:
        """Download, verify and apply one update; on any rejection the current version stays."""
        try:
            header, payload = await self.download(update_id)
            try:
                self.verify(header, payload)
            except UpdateRejected:
                if self.stats.fetch_offsets and self.stats.fetch_offsets[-1] > 0 and self._part(update_id).exists():
                    self._part(update_id).unlink()  # a resumed partial file may be stale: fetch once afresh
                    header, payload = await self.download(update_id)
                    self.verify(header, payload)
                else:
                    raise
            try:
                result = self.apply(payload, header)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                raise UpdateRejected(f"update {update_id}: apply failed: {exc}") from exc
        except UpdateRejected as exc:
            return self._finish(update_id, applied=False, reason=str(exc))
        self.state.current_version = header.target_version
        return self._finish(update_id, applied=True, reason="applied")

    def _finish(self, update_id: int, applied: bool, reason: str) -> FetchOutcome:
        with contextlib.suppress(FileNotFoundError):
            self._part(update_id).unlink()
        if applied:
            self.state.applied.append(update_id)
            self.stats.applied += 1
            log.info("applied update %d -> %s", update_id, self.current_version)
        else:
            self.state.rejected[str(update_id)] = reason
            self.stats.rejected += 1
            log.warning("rejected update %d: %s", update_id, reason)
        self.state.save()
        outcome = FetchOutcome(update_id, applied, reason, self.current_version)
        self.outcomes.append(outcome)
        return outcome

    def next_candidate(self) -> gateway_pb2.UpdateHeader | None:
        """The newest known update built on the current version that was not tried yet."""
        done = set(self.state.applied) | {int(k) for k in self.state.rejected}
        fits = [h for i, h in self.known.items() if i not in done and h.base_version == self.current_version]
        return max(fits, key=lambda h: h.update_id) if fits else None

    async def process_known(self) -> list[FetchOutcome]:
        """Apply every chain of known updates starting from the current version."""
        outcomes = []
        while (header := self.next_candidate()) is not None:
            outcomes.append(await self.fetch_and_apply(header.update_id))
        return outcomes

    def _note(self, notice: gateway_pb2.UpdateNotice) -> None:
        self.known[notice.header.update_id] = notice.header
        self.cursor = max(self.cursor, notice.header.update_id)

    async def sync_once(self) -> list[FetchOutcome]:
        """Learn every update published so far (Heartbeat tells the newest id), then apply what fits."""
        c = self.config
        async for attempt in retrying(c.backoff_initial_s, c.backoff_max_s, c.backoff_jitter_s, 120.0):
            with attempt:
                hb = await self.client.heartbeat("syncing", self.current_version, {}, 0)
                if hb.latest_update_id > self.cursor:
                    call = self.client.watch(self.current_version, self.cursor)
                    try:
                        async for notice in call:
                            self._note(notice)
                            if self.cursor >= hb.latest_update_id:
                                break
                    finally:
                        call.cancel()
        return await self.process_known()

    async def run(self, stop: asyncio.Event) -> None:
        """Watch for updates and apply them until ``stop`` is set (reconnecting with backoff)."""
        task = asyncio.create_task(self._watch_forever())
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, stopper):
                t.cancel()
            for t in (task, stopper):
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    async def _watch_forever(self) -> None:
        c = self.config
        while True:
            async for attempt in retrying(c.backoff_initial_s, c.backoff_max_s, c.backoff_jitter_s):
                with attempt:
                    call = self.client.watch(self.current_version, self.cursor)
                    try:
                        async for notice in call:
                            self._note(notice)
                            await self.process_known()
                    finally:
                        call.cancel()
                    raise IncompleteTransfer("watch stream ended")
