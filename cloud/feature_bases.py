"""The feature bases this cloud knows: those shipped with its families' device models, and refits it keeps.

Every process that decodes uploads (the gateway's validation, the trainer's worker, a Ray teacher actor) calls
:func:`load_known_bases` once at start-up; ``common.sample_codec`` then decodes format /2 samples on them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.feature_basis import KNOWN_BASES, BasisBook, FeatureBasis, fit_basis
from common.sample_codec import FORMATS, UploadSample
from common.tensor_pack import PayloadError

log = logging.getLogger("tandem.cloud.bases")
REFIT_DIR = "feature_bases"
"""Under the trainer's state directory: refitted bases, one ``<version>.safetensors`` each."""


def load_known_bases(adaptation, book: BasisBook = KNOWN_BASES) -> list[str]:
    """Add every family's shipped basis and every kept refit to ``book``; the versions it now knows."""
    for name, family in adaptation.families.items():
        try:
            version = book.add_model_dir(family.device_model)
        except PayloadError as exc:
            log.warning("family %s: device model basis unreadable (%s); format /2 refused for it", name, exc)
            continue
        if version is None:
            log.info("family %s: device model ships no feature basis; its devices send format /1", name)
    if adaptation.state_dir is not None:
        for path in sorted((Path(adaptation.state_dir) / REFIT_DIR).glob("*.safetensors")):
            book.add(FeatureBasis.from_bytes(path.read_bytes()))
    return book.versions()


def keep_refit(basis: FeatureBasis, state_dir: Path, book: BasisBook = KNOWN_BASES) -> Path:
    """Store a refitted basis where every cloud process finds it, and know it here."""
    path = Path(state_dir) / REFIT_DIR / f"{basis.version}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_bytes(basis.to_bytes())
    tmp.replace(path)
    book.add(basis)
    return path


def refit(samples: list[UploadSample], current: FeatureBasis, min_tokens: int = 256) -> FeatureBasis:
    """A basis fitted on received tokens (its ``parent`` is ``current``), to ship down as a basis update.

    Only format /1 uploads carry directions outside the current basis; /2 uploads are reconstructed inside it, so
    a refit on them alone can reorder but not extend it.
    """
    tokens = [s.features for s in samples if s.features.shape[1] == current.dim]
    count = sum(t.shape[0] for t in tokens)
    if count < min_tokens:
        raise ValueError(f"a refit needs at least {min_tokens} tokens of width {current.dim}, got {count}")
    return fit_basis(torch.cat(tokens), rank=current.rank, parent=current.version)


def accepted_formats(book: BasisBook = KNOWN_BASES) -> list[str]:
    """The sample formats to announce: /2 only when a basis is known to decode it on."""
    return list(FORMATS) if book.versions() else [FORMATS[0]]
