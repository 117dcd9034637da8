"""Payload blobs shared by gateways and trainers: one interface, a directory and an S3 implementation."""

from __future__ import annotations

from pathlib import Path

from cloud.blobs.base import BlobError, BlobNotFound, BlobStore, check_key
from cloud.blobs.directory import DirectoryBlobStore

__all__ = ["BlobError", "BlobNotFound", "BlobStore", "DirectoryBlobStore", "check_key", "open_blob_store"]


def open_blob_store(config, default_dir: Path, fsync: bool = True) -> BlobStore:
    """The blob store a ``BlobStoreConfig`` names; a directory store defaults to ``default_dir``."""
    if config.kind == "directory":
        return DirectoryBlobStore(config.directory or default_dir, fsync=fsync)
    from cloud.blobs.s3 import S3BlobStore  # boto3 is imported only when S3 is configured

    return S3BlobStore(config.bucket, config.prefix, config.endpoint_url, config.region, config.create_bucket)
