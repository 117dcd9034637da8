"""Blobs in S3-compatible object storage (AWS S3, MinIO, Ceph RGW, ...) through boto3.

A successful PutObject is durable by the store's contract; the upload carries its MD5 so the store rejects
bytes damaged on the way. Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` from a Kubernetes Secret, an instance role, ``~/.aws``): never from Tandem's config.
"""

from __future__ import annotations

import base64
import hashlib

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from cloud.blobs.base import BlobError, BlobNotFound, BlobStore, check_key

_MISSING = {"404", "NoSuchKey", "NotFound"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3BlobStore(BlobStore):
    """Objects ``<prefix><key>`` in ``bucket``; the bucket must exist (``create_bucket`` makes it if asked)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        create_bucket: bool = False,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        cfg = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60)
        self._s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)
        try:
            self._s3.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if _code(exc) not in _MISSING | {"NoSuchBucket"} or not create_bucket:
                raise BlobError(f"S3 bucket {bucket!r} is not usable at {endpoint_url or 'AWS'}: {exc}") from exc
            self._s3.create_bucket(Bucket=bucket)
        except BotoCoreError as exc:
            raise BlobError(f"S3 endpoint {endpoint_url or 'AWS'} unreachable: {exc}") from exc

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, data: bytes) -> None:
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._name(key), Body=data, ContentMD5=md5)
        except (ClientError, BotoCoreError) as exc:
            raise BlobError(f"S3 put of {key} failed: {exc}") from exc

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            return b""
        args = {"Bucket": self.bucket, "Key": self._name(key)}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{end}"
        try:
            return self._s3.get_object(**args)["Body"].read()
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise BlobNotFound(f"blob {key} not found in s3://{self.bucket}/{self.prefix}") from None
            if _code(exc) == "InvalidRange":  # offset at or past the end
                return b""
            raise BlobError(f"S3 get of {key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobError(f"S3 get of {key} failed: {exc}") from exc

    def size(self, key: str) -> int:
        try:
            return int(self._s3.head_object(Bucket=self.bucket, Key=self._name(key))["ContentLength"])
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise BlobNotFound(f"blob {key} not found in s3://{self.bucket}/{self.prefix}") from None
            raise BlobError(f"S3 head of {key} failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except BlobNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self._name(key))
        except (ClientError, BotoCoreError) as exc:
            raise BlobError(f"S3 delete of {key} failed: {exc}") from exc

    def close(self) -> None:
        self._s3.close()

    def __repr__(self) -> str:
        return f"S3BlobStore(s3://{self.bucket}/{self.prefix}, endpoint={self.endpoint_url})"
