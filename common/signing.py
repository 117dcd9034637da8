"""Ed25519 signing for updates: key generation, PEM load/save, sign and verify (``cryptography``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import TandemError


class SigningError(TandemError):
    """A key file is missing or unreadable, or holds the wrong kind of key."""


def generate_private_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM encoding of a private key (unencrypted; protect the file's permissions)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """SubjectPublicKeyInfo PEM encoding of the public half."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short fingerprint: first 16 hex chars of sha256 over the raw public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def save_private_key(key: Ed25519PrivateKey, path: str | Path) -> None:
    """Write the private key as PEM with mode 0600 (and the public key beside it as ``<path>.pub``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_pem(key))
    Path(f"{p}.pub").write_bytes(public_key_pem(key))


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key from a PEM file."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_public_key_pem(data: bytes, source: str = "public key") -> Ed25519PublicKey:
    """Parse an Ed25519 public key from PEM bytes."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{source} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{source} holds a {type(key).__name__}, expected an Ed25519 public key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key from a PEM file."""
    return load_public_key_pem(_read(path), str(path))


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """64-byte Ed25519 signature of ``message``."""
    return key.sign(message)


def verify(key: Ed25519PublicKey, message: bytes, signature: bytes) -> bool:
    """True if ``signature`` is a valid signature of ``message`` under ``key``."""
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _read(path: str | Path) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise SigningError(f"key file not found: {p}")
    return p.read_bytes()
