"""How a device authenticates on the wire: a bearer token in the call metadata."""

from __future__ import annotations

from collections.abc import Iterable

AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return ((AUTHORIZATION_KEY, f"{BEARER_PREFIX}{token}"),)


def token_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token in ``metadata``, or None when absent or not a bearer credential.

    The scheme is matched case-insensitively (RFC 6750 / RFC 9110: ``Bearer``, ``bearer``, ``BEARER``).
    """
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION_KEY or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == BEARER_PREFIX.strip().lower():
            return token.strip() or None
    return None
