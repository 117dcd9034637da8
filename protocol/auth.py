"""How a device authenticates on the wire: a bearer token in the call metadata."""

from __future__ import annotations

from collections.abc import Iterable

AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return ((AUTHORIZATION_KEY, f"{BEARER_PREFIX}{token}"),)


def token_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token in ``metadata``, or None when absent or not a bearer credential."""
    for key, value in metadata or ():
        if key.lower() == AUTHORIZATION_KEY and isinstance(value, str) and value.startswith(BEARER_PREFIX):
            token = value[len(BEARER_PREFIX) :].strip()
            return token or None
    return None
