"""The storage conformance suite (ckpt.testing.storage_tests) over every backend: the local
disk, fsspec memory://, S3 on a moto server, and FaultyStorage (no rules) around the local disk
and S3 (the fault kit's wrapper must itself keep the contract); GCS and Azure likewise."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ckpt.storage import AzureStorage, S3Storage, Storage, Upload, open_storage
from ckpt.storage._azure import UNCOMMITTED
from ckpt.testing import FaultyStorage, Recorder
from ckpt.testing.storage_tests import StorageTests

_MiB = 1 << 20


def s3_storage(root: str, opts: dict[str, Any]) -> Storage:
    # a small single-PUT limit so that a 6 MiB write takes the multipart path (5 MiB parts)
    return open_storage(root, opts, single_put_max_bytes=_MiB)


def start_s3_upload(storage: Storage, rel: str) -> Upload:
    inner = storage.inner if isinstance(storage, FaultyStorage) else storage
    assert isinstance(inner, S3Storage)
    bucket, key, _ = inner.fs.split_path(inner.path(rel))
    upload_id = inner.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    return Upload(rel, upload_id, time.time())


class TestLocal(StorageTests):
    @pytest.fixture
    def storage(self, local_store: Any) -> Storage:
        return open_storage(local_store.root)


class TestMemory(StorageTests):
    @pytest.fixture
    def storage(self, memory_store: Any) -> Storage:
        return open_storage(memory_store.root)


@pytest.mark.s3
class TestS3(StorageTests):
    identical_create_succeeds = True
    multipart_bytes = 6 * _MiB
    stores_crc32c = True

    @pytest.fixture
    def storage(self, s3_store: Any) -> Storage:
        return s3_storage(s3_store.root, s3_store.opts)

    def start_upload(self, storage: Storage, rel: str) -> Upload:
        return start_s3_upload(storage, rel)


class TestFaultyLocal(StorageTests):
    @pytest.fixture
    def storage(self, local_store: Any) -> Storage:
        return FaultyStorage(open_storage(local_store.root), Recorder())


@pytest.mark.s3
class TestFaultyS3(StorageTests):
    identical_create_succeeds = True
    multipart_bytes = 6 * _MiB
    stores_crc32c = True

    @pytest.fixture
    def storage(self, s3_store: Any) -> Storage:
        return FaultyStorage(s3_storage(s3_store.root, s3_store.opts), Recorder())

    def start_upload(self, storage: Storage, rel: str) -> Upload:
        return start_s3_upload(storage, rel)


def gcs_storage(root: str, opts: dict[str, Any]) -> Storage:
    # a small single-upload limit so that a 6 MiB write takes the resumable path (1 MiB chunks)
    return open_storage(root, opts, single_put_max_bytes=_MiB, part_bytes=_MiB)


@pytest.mark.gcs
class TestGCS(StorageTests):
    identical_create_succeeds = True
    multipart_bytes = 6 * _MiB
    stores_crc32c = True
    lists_uploads = False

    @pytest.fixture
    def storage(self, gcs_store: Any) -> Storage:
        return gcs_storage(gcs_store.root, gcs_store.opts)


@pytest.mark.gcs
class TestFaultyGCS(StorageTests):
    identical_create_succeeds = True
    multipart_bytes = 6 * _MiB
    stores_crc32c = True
    lists_uploads = False

    @pytest.fixture
    def storage(self, gcs_store: Any) -> Storage:
        return FaultyStorage(gcs_storage(gcs_store.root, gcs_store.opts), Recorder())


def azure_storage(root: str, opts: dict[str, Any]) -> Storage:
    # small blocks and a small single-Put limit: a 1.5 MiB write goes up in six staged blocks
    return open_storage(root, opts, part_bytes=_MiB // 4, single_put_max_bytes=_MiB)


def start_azure_upload(storage: Storage, rel: str) -> Upload:
    """A block staged and never committed: what Azure has of an upload in progress."""
    inner = storage.inner if isinstance(storage, FaultyStorage) else storage
    assert isinstance(inner, AzureStorage)
    blob = inner._blob(rel)
    inner._do("stage_block", lambda: blob.stage_block("staged-0", b"abc"))
    return Upload(rel, UNCOMMITTED, time.time())


@pytest.mark.azure
class TestAzure(StorageTests):
    identical_create_succeeds = True
    multipart_bytes = 3 * _MiB // 2

    @pytest.fixture
    def storage(self, azure_store: Any) -> Storage:
        return azure_storage(azure_store.root, azure_store.opts)

    def start_upload(self, storage: Storage, rel: str) -> Upload:
        return start_azure_upload(storage, rel)


@pytest.mark.azure
class TestFaultyAzure(TestAzure):
    @pytest.fixture
    def storage(self, azure_store: Any) -> Storage:
        return FaultyStorage(azure_storage(azure_store.root, azure_store.opts), Recorder())
