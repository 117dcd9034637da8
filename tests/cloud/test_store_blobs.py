"""The blob interface on both implementations: a directory and S3 (moto's server on 127.0.0.1)."""

from __future__ import annotations

import pytest
from store_support import moto_server, s3_bucket  # noqa: F401 (fixture)

from cloud.blobs import BlobError, BlobNotFound, DirectoryBlobStore, check_key


@pytest.fixture(params=["directory", "s3"])
def blobs(request, tmp_path):
    if request.param == "directory":
        store = DirectoryBlobStore(tmp_path / "blobs")
    else:
        from cloud.blobs.s3 import S3BlobStore

        endpoint, bucket = request.getfixturevalue("s3_bucket")
        store = S3BlobStore(bucket, prefix="p/", endpoint_url=endpoint)
    yield store
    store.close()


def test_put_get_ranges_size_delete(blobs):
    data = bytes(range(256)) * 1000
    blobs.put("samples/ab/one", data)
    assert blobs.exists("samples/ab/one") and not blobs.exists("samples/ab/two")
    assert blobs.size("samples/ab/one") == len(data)
    assert blobs.get("samples/ab/one") == data
    assert blobs.get("samples/ab/one", 1000, 5000) == data[1000:6000]
    assert blobs.get("samples/ab/one", 255_990) == data[255_990:]
    assert blobs.get("samples/ab/one", 10, 0) == b""
    assert blobs.get("samples/ab/one", len(data), 10) == b""  # past the end reads nothing
    blobs.put("samples/ab/one", b"replaced")
    assert blobs.get("samples/ab/one") == b"replaced"
    blobs.put("empty", b"")
    assert blobs.get("empty") == b"" and blobs.size("empty") == 0
    blobs.delete("samples/ab/one")
    blobs.delete("samples/ab/one")  # deleting a missing key is fine
    assert not blobs.exists("samples/ab/one")


def test_missing_blob_is_a_clear_error(blobs):
    with pytest.raises(BlobNotFound, match="blob nothing/here not found"):
        blobs.get("nothing/here")
    with pytest.raises(BlobNotFound):
        blobs.size("nothing/here")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "", "sp ace", "a/../../b"])
def test_unsafe_keys_are_refused(blobs, key):
    with pytest.raises(BlobError, match="invalid blob key"):
        blobs.put(key, b"x")
    with pytest.raises(BlobError):
        check_key(key)


def test_directory_put_is_atomic_and_leaves_no_temporaries(tmp_path):
    store = DirectoryBlobStore(tmp_path / "b")
    store.put("x/y/z", b"1" * 10)
    store.put("x/y/z", b"2" * 20)
    files = sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files == ["x/y/z"]
    assert (tmp_path / "b" / "x" / "y" / "z").read_bytes() == b"2" * 20


def test_s3_bucket_must_exist_unless_created(tmp_path):
    from cloud.blobs.s3 import S3BlobStore

    endpoint = moto_server().endpoint
    with pytest.raises(BlobError, match="bucket 'no-such-bucket' is not usable"):
        S3BlobStore("no-such-bucket", endpoint_url=endpoint)
    store = S3BlobStore("made-on-demand", endpoint_url=endpoint, create_bucket=True)
    store.put("k", b"v")
    assert store.get("k") == b"v"
    store.close()


def test_s3_unreachable_endpoint_is_a_clear_error():
    from store_support import free_port

    from cloud.blobs.s3 import S3BlobStore

    with pytest.raises(BlobError, match="unreachable|not usable"):
        S3BlobStore("b", endpoint_url=f"http://127.0.0.1:{free_port()}")


def test_new_keys_are_fresh_and_written_once(blobs):
    keys = [blobs.new_key("samples") for _ in range(70)]  # more than one batch of prepared files
    assert len(set(keys)) == 70 and all(k.startswith("samples/") for k in keys)
    for i, key in enumerate(keys[:3]):
        blobs.put(key, f"batch {i}".encode())
    assert [blobs.get(k) for k in keys[:3]] == [b"batch 0", b"batch 1", b"batch 2"]
