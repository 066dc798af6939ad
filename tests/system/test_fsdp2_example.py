"""examples/fsdp2_dcp.py: 2 CPU ranks with FSDP2 save through ckpt.dcp (dcp.save and
dcp.async_save), load back into a fresh model, and a second run resumes from the newest step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ckpt

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "fsdp2_dcp.py"


def _run(root: Path) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(EXAMPLE), "--root", str(root), "--steps", "6"],
                          capture_output=True, text=True, timeout=240, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_fsdp2_example_saves_loads_and_resumes_through_ckpt(tmp_path: Path) -> None:
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        from fsdp2_dcp import params_digest
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    root = tmp_path / "run"
    first = _run(root)
    for line in ("saved step 3 with dcp.save", "saved step 6 with dcp.async_save",
                 "loaded step 6 into a fresh model: parameters identical: True",
                 "ckpt verify step 3: ok", "ckpt verify step 6: ok"):  # fmt: skip
        assert line in first, first
    second = _run(root)
    assert "resumed from step 6" in second
    assert "saved step 12 with dcp.async_save" in second
    assert ckpt.list_steps(str(root)) == [3, 6, 9, 12]
    assert all(ckpt.verify(str(root), s).ok for s in (3, 6, 9, 12))
    # the digest the ranks printed is that of the parameters ckpt.restore reads whole
    digest = next(ln.split()[-1] for ln in second if ln.startswith("final parameters sha256"))
    assert params_digest(ckpt.restore(str(root))["model"]) == digest
