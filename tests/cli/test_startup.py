"""What starting ckpt imports: ``import ckpt`` and every command that moves no tensor data run
without torch (the CLI on a local root without fsspec or a cloud backend either; ``--help`` and
``ls`` of an empty root without numpy), each checked in a fresh interpreter, whose
``sys.modules`` says what was imported. How long that takes is measured in
benchmarks/cli_bench.py, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckpt

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "crc32c", "fsspec", "s3fs", "gcsfs", "adlfs", "aiobotocore", "asyncio", "zarr", "ray")

# Runs the CLI's main in-process on the argv given as JSON, then prints what it imported.
_RUN_CLI = """
import json, sys
from ckpt.cli import main
rc = main(json.loads(sys.argv[1]))
print(json.dumps({"rc": rc, "imported": sorted(m for m in HEAVY if m in sys.modules)}))
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{code}", *args],
        cwd=REPO,  # this checkout's ckpt first on the path
        capture_output=True,
        text=True,
        timeout=120,
    )


def _cli(*argv: str) -> tuple[int, list[str]]:
    """The exit code of ``ckpt ARGV`` run in a fresh interpreter, and which of HEAVY it imported."""
    p = _python(_RUN_CLI, json.dumps(argv))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout.splitlines()[-1])
    return doc["rc"], doc["imported"]


def test_import_ckpt_is_cheap_and_the_api_still_works(tmp_path: Path) -> None:
    p = _python(
        """
import json, sys
import ckpt
before = sorted(m for m in HEAVY if m in sys.modules)
lazy_dcp = "ckpt.dcp" not in sys.modules
missing = [name for name in ckpt.__all__ if getattr(ckpt, name, None) is None]
listed = set(ckpt.__all__) <= set(dir(ckpt))
import torch
m = ckpt.save(sys.argv[1], {"w": torch.arange(6.0).reshape(2, 3), "n": 7}, step=3)
back = ckpt.restore(sys.argv[1])
print(json.dumps([before, lazy_dcp, missing, listed, m.step, back["w"].tolist(), back["n"]]))
""",
        str(tmp_path / "run"),
    )
    assert p.returncode == 0, p.stderr
    before, lazy_dcp, missing, listed, step, w, n = json.loads(p.stdout.splitlines()[-1])
    assert "torch" not in before
    assert "numpy" not in before
    assert "fsspec" not in before
    assert lazy_dcp
    assert missing == []
    assert listed
    assert (step, w, n) == (3, [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], 7)


def test_lazy_names_are_the_defining_modules_objects() -> None:
    from ckpt.lifecycle.save import save
    from ckpt.state.shard import Shard

    assert ckpt.save is save
    assert ckpt.Shard is Shard
    assert ckpt.dcp.__name__ == "ckpt.dcp"
    with pytest.raises(AttributeError, match="no_such_name"):
        ckpt.no_such_name  # noqa: B018


def test_help_and_ls_of_an_empty_root_import_nothing_heavy(tmp_path: Path) -> None:
    assert _cli("--help") == (0, [])
    assert _cli("ls", str(tmp_path)) == (3, [])  # no checkpoints: exit 3


def test_commands_that_move_no_tensor_import_no_torch(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    for step in (1, 2):
        ckpt.save(root, {"w": torch.randn(4, 4), "b": torch.zeros(3, dtype=torch.bfloat16), "lr": 0.1}, step=step)
    for argv in (
        ("ls", root),
        ("ls", root, "--json"),
        ("show", root),
        ("show", f"{root}@1", "--json"),
        ("verify", root),
        ("verify", root, "--all", "--json"),
        ("rm", root, "1", "--dry-run"),
        ("gc", root, "--dry-run"),
        ("cp", root, str(tmp_path / "copy")),
        ("rm", root, "1"),
    ):
        rc, imported = _cli(*argv)
        assert rc == 0, argv
        # manifests need numpy and crc32c; nothing needs torch, fsspec or a cloud client
        assert set(imported) <= {"numpy", "crc32c"}, (argv, imported)
    assert ckpt.list_steps(root) == [2]
    assert ckpt.verify(str(tmp_path / "copy"), 1).ok
