"""The one update header: built by the DWC step, signed by the registry, verified and applied by the device.

Versions are strings everywhere (the registry, the wire, the device's adapter store). The cloud names its
versions with counters ("v0", "v1", ...) that never repeat for a device, so a rebased mirror never reissues a
version a device once held with other weights; :func:`next_version` gives the successor. "v0" is the adapter
both sides initialise from the shared seed (the device's ``initial_version``).

The DWC facts about a payload (its format, quantization bits, the units it touches and the digest of the state
after apply) travel in ``metadata`` so the signature covers them; typed properties read them back.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

from common.errors import TandemError
from common.signing import Ed25519PrivateKey, Ed25519PublicKey, key_id, sign, verify

CANONICAL_VERSION = 1
VERSION_RE = re.compile(r"^[A-Za-z0-9._:+-]{1,128}$")
INITIAL_VERSION = "v0"
_COUNTER_RE = re.compile(r"^(.*?)(\d+)$")


class UpdateError(TandemError):
    """An adapter update cannot be built, described or applied (wrong base, bad payload or header)."""


def check_version(value: str, what: str = "version") -> str:
    """``value`` if it is a valid version string (1-128 chars of [A-Za-z0-9._:+-]), else UpdateError."""
    if not isinstance(value, str) or not VERSION_RE.match(value):
        raise UpdateError(f"{what} {value!r} must be 1-128 chars of [A-Za-z0-9._:+-]")
    return value


def next_version(version: str, at_least: int = 0) -> str:
    """The successor of a counter version ("v4" -> "v5", "4" -> "5"), or ``prefix + at_least`` when larger;
    UpdateError for a name that does not end in digits."""
    match = _COUNTER_RE.match(version)
    if match is None:
        raise UpdateError(f"version {version!r} does not end in a counter; name the target version explicitly")
    return f"{match.group(1)}{max(int(match.group(2)) + 1, at_least)}"


def version_counter(version: str) -> int:
    """The counter at the end of a version name (-1 when there is none)."""
    match = _COUNTER_RE.match(version)
    return int(match.group(2)) if match else -1


@dataclass(frozen=True)
class UpdateHeader:
    """What an update promises: for whom, from which version to which, and exactly which bytes.

    ``device_id`` and ``cohort`` are empty until the update is addressed (see :meth:`addressed`); ``size`` and
    ``sha256_hex`` describe the payload bytes.
    """

    device_id: str
    cohort: str
    base_version: str
    target_version: str
    sha256_hex: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)

    def addressed(self, device_id: str = "", cohort: str = "") -> UpdateHeader:
        """The same header addressed to one device or to a cohort."""
        return dataclasses.replace(self, device_id=device_id, cohort=cohort)

    @property
    def result_sha256(self) -> str:
        """Digest of the adapter state after apply ('' when the payload is not a DWC delta)."""
        return self.metadata.get("result_sha256", "")

    @property
    def bits(self) -> int:
        """Quantization bits of a DWC payload (0 when absent)."""
        return _int_meta(self.metadata, "bits")

    @property
    def units_sent(self) -> int:
        """Units (rows or columns) the payload changes."""
        return _int_meta(self.metadata, "units_sent")

    @property
    def units_total(self) -> int:
        """Units in the adapter layout."""
        return _int_meta(self.metadata, "units_total")

    def canonical_bytes(self) -> bytes:
        """Deterministic encoding covered by the signature (sorted-key compact JSON)."""
        doc = {
            "v": CANONICAL_VERSION,
            "device_id": self.device_id,
            "cohort": self.cohort,
            "base_version": self.base_version,
            "target_version": self.target_version,
            "sha256": self.sha256_hex,
            "size": self.size,
            "metadata": dict(sorted(self.metadata.items())),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def sign(self, key: Ed25519PrivateKey) -> tuple[bytes, str]:
        """``(signature, key_id)`` for this header."""
        return sign(key, self.canonical_bytes()), key_id(key)

    def verify(self, key: Ed25519PublicKey, signature: bytes) -> bool:
        """True if ``signature`` signs this header under ``key``."""
        return verify(key, self.canonical_bytes(), signature)


def _int_meta(meta: dict[str, str], key: str) -> int:
    try:
        return int(meta.get(key, "0"))
    except ValueError:
        raise UpdateError(f"update header metadata {key!r} is not an integer") from None


def header_to_json(header: UpdateHeader) -> str:
    """The header as compact JSON (for stores and logs)."""
    return json.dumps(dataclasses.asdict(header), sort_keys=True, separators=(",", ":"))


def header_from_json(text: str | bytes) -> UpdateHeader:
    """Parse a header; UpdateError on missing or mistyped fields."""
    try:
        data = json.loads(text)
        fields = UpdateHeader.__dataclass_fields__
        if not isinstance(data, dict) or set(data) != set(fields):
            raise ValueError("wrong fields")
        for key in fields:
            want = {"size": int, "metadata": dict}.get(key, str)
            if type(data[key]) is not want:
                raise ValueError(f"{key} has the wrong type")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in data["metadata"].items()):
            raise ValueError("metadata must map strings to strings")
        return UpdateHeader(**data)
    except (ValueError, TypeError) as exc:
        raise UpdateError(f"malformed update header: {exc}") from None
