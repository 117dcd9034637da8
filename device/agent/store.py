"""Adapter versions on disk: the applied adapter (PEFT format), its version and digest, and the previous one.

Layout under ``<state_dir>/adapters/``::

    versions/<n>-<version>/adapter_model.safetensors   PEFT key names, exactly the weights served
    versions/<n>-<version>/adapter_config.json         peft's LoraConfig (PeftModel.from_pretrained loads it)
    versions/<n>-<version>/tandem.json                 version and digest
    HEAD.json                                          {"current": ..., "previous": ..., "rollback": ...}

A version directory is written under a temporary name, fsynced and renamed; ``HEAD.json`` is replaced atomically
afterwards. A crash at any point leaves HEAD naming complete directories: the old pair or the new one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.delta_codec import state_digest
from common.durable import fsync_dir, write_synced
from common.errors import TandemError
from common.faults import fault_point

WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
META = "tandem.json"
HEAD = "HEAD.json"


class AdapterStoreError(TandemError):
    """The adapter store on disk is missing or damaged."""


@dataclass
class AdapterState:
    """One adapter version (the version string of the update header) and its weights."""

    version: str
    state: dict[str, torch.Tensor]
    _digest: str | None = field(default=None, repr=False, compare=False)

    def digest(self) -> str:
        """Digest of the exact weights (``common.delta_codec.state_digest``, as the cloud's mirror computes it)."""
        if self._digest is None:
            self._digest = state_digest(self.state)
        return self._digest


@dataclass(frozen=True)
class Rollback:
    """A rollback not yet reported to the cloud."""

    rolled_back_from: str
    reason: str


class AdapterStore:
    """The current and previous adapter versions of one device, on disk."""

    def __init__(self, directory: str | Path, peft_config: dict | None = None) -> None:
        self.root = Path(directory)
        self.versions = self.root / "versions"
        self.versions.mkdir(parents=True, exist_ok=True)
        self.peft_config = peft_config or {}
        self._head = self._read_head()
        self._collect_garbage()

    # -- reading -------------------------------------------------------------------------------------------
    def _read_head(self) -> dict:
        path = self.root / HEAD
        if not path.is_file():
            return {"current": None, "previous": None, "rollback": None, "counter": 0}
        try:
            head = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AdapterStoreError(f"adapter store head {path} is unreadable: {exc}") from None
        for key in ("current", "previous"):
            name = head.get(key)
            if name is not None and not (self.versions / name / META).is_file():
                raise AdapterStoreError(f"adapter store names version directory {name!r}, which is missing")
        return head

    def _load(self, name: str | None) -> AdapterState | None:
        if name is None:
            return None
        d = self.versions / name
        meta = json.loads((d / META).read_text())
        state = load_file(str(d / WEIGHTS))
        adapter = AdapterState(meta["version"], state)
        if adapter.digest() != meta["digest"]:
            raise AdapterStoreError(f"adapter version {meta['version']} in {d} fails its digest (disk damage?)")
        return adapter

    @property
    def empty(self) -> bool:
        return self._head["current"] is None

    def current(self) -> AdapterState:
        """The version to serve (AdapterStoreError when the store is empty)."""
        adapter = self._load(self._head["current"])
        if adapter is None:
            raise AdapterStoreError(f"adapter store {self.root} holds no version yet")
        return adapter

    def previous(self) -> AdapterState | None:
        return self._load(self._head["previous"])

    def pending_rollback(self) -> Rollback | None:
        rb = self._head.get("rollback")
        return Rollback(rb["from"], rb["reason"]) if rb else None

    def describe(self) -> dict:
        """Versions and digests without loading weights (for status)."""
        out = {}
        for key in ("current", "previous"):
            name = self._head.get(key)
            out[key] = json.loads((self.versions / name / META).read_text()) if name else None
        out["rollback"] = self._head.get("rollback")
        return out

    # -- writing -------------------------------------------------------------------------------------------
    def _write_version(self, adapter: AdapterState) -> str:
        counter = int(self._head.get("counter", 0)) + 1
        self._head["counter"] = counter
        name = f"{counter:06d}-{re.sub(r'[^A-Za-z0-9._-]', '_', adapter.version)[:64]}"
        tmp = self.versions / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter.state.items()}, str(tmp / WEIGHTS))
        with open(tmp / WEIGHTS, "rb+") as fh:
            os.fsync(fh.fileno())
        write_synced(tmp / PEFT_CONFIG, json.dumps(self.peft_config, indent=2, default=str).encode())
        meta = {"version": adapter.version, "digest": adapter.digest()}
        write_synced(tmp / META, json.dumps(meta, indent=2).encode())
        fsync_dir(tmp)
        os.rename(tmp, self.versions / name)
        fsync_dir(self.versions)
        return name

    def _write_head(self) -> None:
        tmp = self.root / f"{HEAD}.tmp"
        write_synced(tmp, json.dumps(self._head, indent=2).encode())
        os.replace(tmp, self.root / HEAD)
        fsync_dir(self.root)

    def _collect_garbage(self) -> None:
        keep = {self._head.get("current"), self._head.get("previous")}
        for d in self.versions.iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def commit(self, adapter: AdapterState) -> None:
        """Make ``adapter`` current and the current version previous (atomically)."""
        name = self._write_version(adapter)
        fault_point("agent.before_head_swap")  # test-only: kill -9 between apply and HEAD swap (common/faults.py)
        self._head = {**self._head, "previous": self._head["current"], "current": name}
        self._write_head()
        fault_point("agent.after_head_swap")  # test-only: kill -9 after the swap, before it is reported
        self._collect_garbage()

    def rollback(self, reason: str) -> AdapterState:
        """Serve the previous version again; the rollback is kept until ``acknowledge_rollback``."""
        if self._head["previous"] is None:
            raise AdapterStoreError("no previous adapter version to roll back to")
        left = json.loads((self.versions / self._head["current"] / META).read_text())["version"]
        self._head = {
            **self._head,
            "current": self._head["previous"],
            "previous": None,
            "rollback": {"from": left, "reason": reason},
        }
        self._write_head()
        self._collect_garbage()
        return self.current()

    def acknowledge_rollback(self) -> None:
        """The cloud was told about the rollback."""
        if self._head.get("rollback") is not None:
            self._head = {**self._head, "rollback": None}
            self._write_head()

    def export_peft(self, directory: str | Path) -> Path:
        """Copy the current version as a PEFT adapter directory."""
        name = self._head["current"]
        if name is None:
            raise AdapterStoreError(f"adapter store {self.root} holds no version yet")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for f in (WEIGHTS, PEFT_CONFIG):
            shutil.copyfile(self.versions / name / f, out / f)
        return out
