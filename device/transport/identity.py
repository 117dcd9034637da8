"""The device's credentials (id, token, cloud key), kept in ``<state_dir>/identity.json`` with mode 0600."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import TandemError


class NotRegisteredError(TandemError):
    """The device has no saved identity yet."""


@dataclass(frozen=True)
class DeviceIdentity:
    """What Register returned, saved for later calls."""

    device_id: str
    token: str
    cohort: str
    gateway: str
    cloud_public_key_pem: str
    chunk_size: int
    max_sample_bytes: int
    sample_formats: tuple[str, ...] = ()
    """Sample formats the cloud accepts (empty: an older cloud, format /1 only)."""
    feature_bases: tuple[str, ...] = ()
    """Feature basis versions the cloud decodes format /2 on."""

    @staticmethod
    def path(state_dir: str | Path) -> Path:
        """Where the identity lives under ``state_dir``."""
        return Path(state_dir) / "identity.json"

    def save(self, state_dir: str | Path) -> Path:
        """Write atomically with owner-only permissions."""
        path = self.path(state_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, state_dir: str | Path) -> DeviceIdentity:
        """Read the saved identity; NotRegisteredError when there is none."""
        path = cls.path(state_dir)
        if not path.is_file():
            raise NotRegisteredError(f"no device identity at {path}; run `tandem-device register` first")
        try:
            doc = json.loads(path.read_text())
            doc.update({k: tuple(doc[k]) for k in ("sample_formats", "feature_bases") if k in doc})
            return cls(**doc)
        except (json.JSONDecodeError, TypeError) as exc:
            raise TandemError(f"device identity {path} is unreadable: {exc}") from exc
