"""Running one benchmark case in a fresh interpreter: the parent passes the case as JSON on the
command line (``--child SPEC``) and reads the child's result from the line starting with
:data:`RESULT_TAG` on its stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

RESULT_TAG = "RESULT "


def run_in_child(module: str, spec: dict[str, Any], *, timeout_s: float, what: str) -> dict[str, Any]:
    """``python -m module --child SPEC`` with this checkout first on the path; its result."""
    cmd = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return dict(json.loads(line[len(RESULT_TAG) :]))
    raise RuntimeError(f"case {what} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
