"""The ckpt command line on an az:// root (Azurite): ls / show / verify / rm / gc / cp / export /
adopt, with the connection string as a storage option (never printed)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import ckpt
from ckpt.cli import main
from ckpt.storage import AzureStorage, open_storage
from tests.conftest import Store

pytestmark = pytest.mark.azure


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(32, 8, generator=g), "b": torch.zeros(8)}, "step": step}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    secret = argv[-1].split("AccountKey=")[-1].split(";")[0]
    assert secret not in out
    assert secret not in err
    return rc, json.loads(out) if "--json" in argv and out.strip() else out


def test_the_cli_on_an_az_root(azure_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    root, opts = azure_store.root, azure_store.opts
    conn = f"connection_string={opts['connection_string']}"
    for step in (1, 2, 3):
        ckpt.save(root, _state(step), step=step, storage_options=opts)

    rc, doc = _run(capsys, "ls", root, "--json", "--storage-option", conn)
    assert rc == 0
    assert [s["step"] for s in doc["steps"]] == [1, 2, 3]
    rc, doc = _run(capsys, "show", f"{root}@2", "--json", "--storage-option", conn)
    assert (rc, doc["step"]) == (0, 2)
    rc, doc = _run(capsys, "verify", root, "--all", "--json", "--storage-option", conn)
    assert rc == 0
    rc, _ = _run(capsys, "rm", root, "1", "--storage-option", conn)
    assert rc == 0
    assert ckpt.list_steps(root, storage_options=opts) == [2, 3]

    # garbage: an unreferenced data file and a blob with only staged blocks (an abandoned write)
    st = open_storage(root, opts)
    assert isinstance(st, AzureStorage)
    st.write_file("data/000000000009-dead/00000-0.safetensors", [b"junk"], size=4, fsync=False)
    blob = st._blob("data/000000000009-dead/00000-1.safetensors")
    st._do("stage_block", lambda: blob.stage_block("staged-0", b"abc"))
    assert [u.key for u in st.multipart_uploads()] == ["data/000000000009-dead/00000-1.safetensors"]
    rc, doc = _run(capsys, "gc", root, "--grace-hours", "0", "--json", "--storage-option", conn)
    assert rc == 0
    assert doc["root"] == root
    assert doc["deleted"] == ["data/000000000009-dead/00000-0.safetensors"]
    assert doc["aborted_uploads"] == ["data/000000000009-dead/00000-1.safetensors"]
    assert st.multipart_uploads() == []
    assert not [f for f in st.list_files("data") if "dead" in f.path]

    dst = root + "-copy"
    rc, _ = _run(capsys, "cp", root, dst, "--quiet", "--storage-option", conn)
    assert rc == 0
    assert ckpt.list_steps(dst, storage_options=opts) == [2, 3]
    assert ckpt.verify(dst, 3, storage_options=opts).ok

    hf = root + "-hf"
    rc, _ = _run(
        capsys,
        "export",
        "--format",
        "hf",
        f"{root}@3",
        hf,
        "--storage-option",
        conn,
        "--dst-storage-option",
        conn,
    )
    assert rc == 0
    rc, _ = _run(capsys, "adopt", hf, "--storage-option", conn)
    assert rc == 0
    back = ckpt.restore(hf, 0, storage_options=opts)
    assert torch.equal(back["model/w"], _state(3)["model"]["w"])
