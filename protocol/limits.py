"""Wire limits shared by the gateway and the device client."""

from __future__ import annotations

import re

MiB = 1024 * 1024

DEFAULT_CHUNK_SIZE = 1 * MiB
"""Payload bytes per message; every payload larger than this is split into chunks."""

DEFAULT_MAX_MESSAGE_BYTES = 4 * MiB
"""gRPC send/receive limit per message; must exceed the chunk size plus the message envelope."""

DEFAULT_MAX_SAMPLE_BYTES = 64 * MiB
"""Largest sample payload the gateway accepts."""

MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 4096

REJECTED_SEQ_TRAILER = "tandem-rejected-seq"
"""Trailing-metadata key naming a sample the gateway refuses for its content (resending cannot help)."""

ACKED_SEQ_TRAILER = "tandem-acked-seq"
"""Trailing-metadata key on a failed Upload: the device's highest stored seq after the call."""

MAX_VERSION_CHARS = 128
"""Longest version string (``current_version``, ``applied_version``) the gateway records."""

ENVELOPE_SLACK_BYTES = 64 * 1024
"""Room left in a message for everything but the chunk data (headers, metadata, tensor list)."""


def check_chunk_fits(chunk_size: int, max_message_bytes: int) -> None:
    """Raise ValueError when chunks of ``chunk_size`` bytes cannot fit in a ``max_message_bytes`` message."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if chunk_size + ENVELOPE_SLACK_BYTES > max_message_bytes:
        raise ValueError(
            f"chunk_size {chunk_size} plus {ENVELOPE_SLACK_BYTES} bytes of envelope exceeds "
            f"max_message_bytes {max_message_bytes}"
        )


DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
"""A device id: 1-128 chars of ``[A-Za-z0-9._-]``."""

COHORT_RE = re.compile(r"^[A-Za-z0-9._-]{0,128}$")
"""A cohort name: at most 128 chars of ``[A-Za-z0-9._-]`` (empty: no cohort)."""
