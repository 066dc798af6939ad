"""open_storage of a plain local path skips fsspec (ckpt.storage imports it only for roots that
need it) and must open exactly the root fsspec's LocalFileSystem would; roots that are not plain
paths still go through fsspec, and opening them imports no cloud backend they do not use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from ckpt.storage import LocalStorage, open_storage

REPO = Path(__file__).resolve().parents[2]
ROOTS = ["run", "run/", "./run", "a/../run", ".", "", "~", "~/run", "/abs/run", "/abs/run//", "//two/run", "with:colon", "sp ace"]


@pytest.mark.parametrize("root", ROOTS)
def test_a_plain_path_opens_the_root_fsspec_would(
    root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fs, path = fsspec.core.url_to_fs(root)
    assert isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    opened = open_storage(root)
    assert isinstance(opened, LocalStorage)
    assert opened.url == LocalStorage(path).url


@pytest.mark.parametrize("root", ["file://{}", "file:{}", "local://{}", "simplecache::file://{}"])
def test_urls_of_local_files_still_open_through_fsspec(root: str, tmp_path: Path) -> None:
    opened = open_storage(root.format(tmp_path / "run"))
    assert opened.url.endswith(f"{tmp_path.name}/run")


def test_a_local_path_with_options_goes_through_fsspec(tmp_path: Path) -> None:
    opened = open_storage(str(tmp_path / "run"), {"auto_mkdir": True})
    assert isinstance(opened, LocalStorage)
    assert opened.url == str(tmp_path / "run")


def test_opening_local_and_memory_roots_imports_no_cloud_backend(tmp_path: Path) -> None:
    code = """
import json, sys
from ckpt.storage import open_storage
open_storage(sys.argv[1])
local = sorted(m for m in sys.modules if m.split(".")[0] in ("fsspec", "asyncio") or m.startswith("ckpt.storage._"))
open_storage("memory://startup-test")
clouds = ("s3fs", "gcsfs", "adlfs", "aiobotocore", "botocore", "ckpt.storage._object", "ckpt.storage._s3", "ckpt.storage._gcs", "ckpt.storage._azure")
memory = sorted(m for m in clouds if m in sys.modules)
print(json.dumps([local, memory]))
"""
    p = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    local, memory = json.loads(p.stdout)
    assert local == ["ckpt.storage._base", "ckpt.storage._fsspec", "ckpt.storage._local"]
    assert memory == []
