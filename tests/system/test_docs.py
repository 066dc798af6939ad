"""The docs say what the code (and the tools around it) do: checked where a statement can be."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ckpt

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _section(doc: str, heading: str) -> str:
    text = (DOCS / doc).read_text()
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start : end if end > 0 else None]


def test_deploy_doc_says_ckpt_probes_if_none_match_as_s3_doc_and_code_do() -> None:
    deploy = _section("deploy.md", "## If-None-Match")
    assert "cannot tell" not in deploy  # the probe tells (docs/s3.md, "Conditional-write probe")
    assert "conditional-write probe" in deploy
    assert "ConditionalWriteUnsupportedError" in deploy
    assert "allow_non_atomic_commit=True" in deploy
    assert issubclass(ckpt.ConditionalWriteUnsupportedError, ckpt.PlanError)
    assert "_ckpt_probe/" in deploy
    assert "_ckpt_probe/" in _section("s3.md", "## Conditional-write probe")


@pytest.mark.slow
def test_torchrun_turns_the_preemption_exit_code_into_1_as_the_training_loop_doc_says(tmp_path: Path) -> None:
    doc = _section("training-loop.md", "### Exit codes under torchrun")
    assert "torchrun itself\nexits 1" in doc or "torchrun itself exits 1" in doc.replace("\n", " ")
    assert "--max-restarts" in doc
    assert "exit_on_stop=False" in doc
    worker = tmp_path / "worker.py"
    worker.write_text("import sys\nsys.exit(75)\n")  # what every rank does after a preemption save
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "0",
         "--master-addr", "127.0.0.1", "--master-port", "0", str(worker)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "exitcode" in done.stderr
    assert "75" in done.stderr
