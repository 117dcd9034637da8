"""A shared low-dimensional basis for vision-tower features (PCA), versioned by its content.

The device projects the tokens it uploads onto the top components of the basis (``common.feature_codec``); the
cloud, holding the same basis, projects them back. A basis ships with the device model
(``<model dir>/feature_basis/basis.safetensors``); the cloud may refit one on what it receives and send it down
as a signed update (:func:`basis_update_header`, verified by :func:`verify_basis_update`).

Stored tensors: ``mean`` fp32 [D], ``components`` fp16 [R, D] (orthonormal rows, largest variance first),
``stds`` fp32 [R] (the coefficient standard deviations on the fitting data). The version is the first 12 hex
characters of sha256 over those bytes, so equal content means equal version on every machine.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from common.tensor_pack import PayloadError, pack, require, unpack
from common.update_header import UpdateError, UpdateHeader, check_version

BASIS_FORMAT = "tandem.feature_basis/1"
BASIS_DIR = "feature_basis"
BASIS_FILE = "basis.safetensors"
BASIS_KIND = "feature_basis"
"""``metadata["kind"]`` of an update header that carries a basis instead of an adapter delta."""
MAX_BASIS_DIM = 65536


@dataclass(frozen=True, eq=False)
class FeatureBasis:
    """Mean, principal directions and coefficient scales of one feature space."""

    mean: torch.Tensor  # [D] float32
    components: torch.Tensor  # [R, D] float16, orthonormal rows
    stds: torch.Tensor  # [R] float32, > 0
    parent: str = ""  # the version this one was refitted from ('' for a shipped basis)

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    @property
    def rank(self) -> int:
        return int(self.components.shape[0])

    @property
    def version(self) -> str:
        h = hashlib.sha256()
        for t in (self.mean, self.components, self.stds):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:12]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureBasis) and (self.version, self.parent) == (other.version, other.parent)

    def __hash__(self) -> int:
        return hash((self.version, self.parent))

    def to_bytes(self) -> bytes:
        """Safetensors bytes (what ships in a model directory and in a basis update)."""
        meta = {"format": BASIS_FORMAT, "version": self.version, "parent": self.parent}
        return pack({"mean": self.mean, "components": self.components, "stds": self.stds}, meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureBasis:
        """Parse and check a basis; PayloadError naming what is wrong."""
        tensors, meta = unpack(data)
        if meta.get("format") != BASIS_FORMAT:
            raise PayloadError(f"not a feature basis (format {meta.get('format', '')[:40]!r})")
        mean, comps, stds = (tensors.get(k) for k in ("mean", "components", "stds"))
        if mean is None or comps is None or stds is None or set(tensors) != {"mean", "components", "stds"}:
            raise PayloadError("a feature basis holds exactly mean, components and stds")
        if mean.dtype != torch.float32 or comps.dtype != torch.float16 or stds.dtype != torch.float32:
            raise PayloadError("feature basis dtypes must be mean F32, components F16, stds F32")
        if mean.dim() != 1 or not 1 <= mean.numel() <= MAX_BASIS_DIM:
            raise PayloadError(f"feature basis mean must be [D], 1 <= D <= {MAX_BASIS_DIM}")
        if comps.dim() != 2 or comps.shape[1] != mean.numel() or not 1 <= comps.shape[0] <= mean.numel():
            raise PayloadError("feature basis components must be [R, D] with 1 <= R <= D")
        if stds.shape != (comps.shape[0],):
            raise PayloadError("feature basis stds must be [R]")
        if not all(bool(torch.isfinite(t.float()).all()) for t in (mean, comps, stds)) or bool((stds <= 0).any()):
            raise PayloadError("feature basis values must be finite and its stds positive")
        basis = cls(mean, comps, stds, meta.get("parent", ""))
        if require(meta, "version") != basis.version:
            raise PayloadError("feature basis content does not match its version")
        return basis

    def save(self, model_dir: str | Path) -> Path:
        """Write ``<model_dir>/feature_basis/basis.safetensors`` (kept as it is when it already holds this basis:
        safetensors orders metadata arbitrarily, so equal bases need not be equal files); returns the path."""
        path = Path(model_dir) / BASIS_DIR / BASIS_FILE
        if load_basis(model_dir) == self:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path


def fit_basis(features: torch.Tensor, rank: int | None = None, parent: str = "") -> FeatureBasis:
    """PCA of tokens [..., D] (float64 covariance, eigh): the top ``rank`` components (all by default).

    Each component's sign is fixed (its largest-magnitude entry positive), so the same features give the same
    bytes, and so the same version.
    """
    x = features.detach().reshape(-1, features.shape[-1]).double().cpu()
    if x.shape[0] < 2:
        raise ValueError("fitting a basis needs at least two tokens")
    d = x.shape[1]
    rank = d if rank is None else rank
    if not 1 <= rank <= d:
        raise ValueError(f"rank must lie in [1, {d}]")
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    order = torch.argsort(eigvals, descending=True)[:rank]
    comps = eigvecs[:, order].T.contiguous()
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = (comps * signs).to(torch.float16)
    coeffs = centred @ comps.double().T
    stds = coeffs.std(0).clamp_min(1e-6)
    return FeatureBasis(mean.float(), comps, stds.float(), parent)


def basis_path(model_dir: str | Path) -> Path:
    """Where a model directory keeps its basis."""
    return Path(model_dir) / BASIS_DIR / BASIS_FILE


def load_basis(model_dir: str | Path) -> FeatureBasis | None:
    """The basis shipped with a model directory, or None when it has none."""
    path = basis_path(model_dir)
    if not path.is_file():
        return None
    return FeatureBasis.from_bytes(path.read_bytes())


class BasisBook:
    """The bases a process knows, by version (thread-safe; the gateway validates uploads in a thread pool)."""

    def __init__(self) -> None:
        self._bases: dict[str, FeatureBasis] = {}
        self._lock = threading.Lock()

    def add(self, basis: FeatureBasis) -> str:
        with self._lock:
            self._bases[basis.version] = basis
        return basis.version

    def add_model_dir(self, model_dir: str | Path) -> str | None:
        """Add the basis a model directory ships with (None when it has none or is a hub id)."""
        basis = load_basis(model_dir) if Path(model_dir).is_dir() else None
        return self.add(basis) if basis is not None else None

    def get(self, version: str) -> FeatureBasis | None:
        with self._lock:
            return self._bases.get(version)

    def versions(self) -> list[str]:
        with self._lock:
            return sorted(self._bases)


KNOWN_BASES = BasisBook()
"""The bases this process knows (the cloud fills it from its families' device models at start-up)."""


def basis_update_header(basis: FeatureBasis, payload: bytes, base_version: str) -> UpdateHeader:
    """The unsigned header of an update that replaces basis ``base_version`` by ``basis``."""
    from common.codec import sha256_hex

    return UpdateHeader(
        device_id="",
        cohort="",
        base_version=check_version(base_version, "basis base version"),
        target_version=basis.version,
        sha256_hex=sha256_hex(payload),
        size=len(payload),
        metadata={"kind": BASIS_KIND, "rank": str(basis.rank), "dim": str(basis.dim)},
    )


def verify_basis_update(
    header: UpdateHeader, payload: bytes, signature: bytes, public_key, held_version: str
) -> FeatureBasis:
    """Check a basis update (signature, kind, base version, size, digest, content) and return the new basis.

    UpdateError naming the first check that fails; nothing is applied by this function.
    """
    from common.codec import sha256_hex

    if not header.verify(public_key, signature):
        raise UpdateError("basis update signature does not verify under the cloud's key")
    if header.metadata.get("kind") != BASIS_KIND:
        raise UpdateError(f"update kind {header.metadata.get('kind', '')!r} is not a feature basis")
    if header.base_version != held_version:
        raise UpdateError(f"basis update applies to {header.base_version!r}, the device holds {held_version!r}")
    if len(payload) != header.size or sha256_hex(payload) != header.sha256_hex:
        raise UpdateError("basis update payload does not match its header's size and digest")
    try:
        basis = FeatureBasis.from_bytes(payload)
    except PayloadError as exc:
        raise UpdateError(f"basis update payload: {exc}") from None
    if basis.version != header.target_version:
        raise UpdateError(f"basis update carries version {basis.version}, header names {header.target_version}")
    return basis
