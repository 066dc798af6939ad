"""Static rules over the package source: no pickle-family decoders, no eval, no credentials in
what travels between processes; and the examples run."""

from __future__ import annotations

import ast
import os
import pathlib
import pickle
import subprocess
import sys

import pytest

import ckpt

PACKAGE = pathlib.Path(ckpt.__file__).parent
EXAMPLES = PACKAGE.parent / "examples"

BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}


def _sources() -> list[pathlib.Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    return files


@pytest.mark.parametrize("path", _sources(), ids=lambda p: p.name)
def test_no_pickle_eval_or_unsafe_loaders(path: pathlib.Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [a.name for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in BANNED_MODULES:
            problems.append(node.module)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if (isinstance(f, ast.Name) and name in BANNED_CALLS) or (owner, name) in {
                ("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("np", "load"), ("numpy", "load"),
            }:  # fmt: skip
                problems.append(f"{owner + '.' if owner else ''}{name}() at line {node.lineno}")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    problems.append(f"allow_pickle at line {node.lineno}")
    assert problems == []


def test_the_checker_catches_what_it_bans(tmp_path: pathlib.Path) -> None:
    """The rule above really fires (guards against a checker that passes everything)."""
    bad = "import pickle\nimport torch\nx = torch.load('f')\ny = eval('1')\nimport numpy as np\nnp.load('a', allow_pickle=True)\n"
    tree = ast.parse(bad)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import)]
    assert any(a.name == "pickle" for n in imports for a in n.names)
    assert len(calls) == 3


def test_attempt_and_report_hold_no_credentials(memory_store: object) -> None:
    import torch

    secret = "AKIA-SECRET-DO-NOT-LEAK"
    root = "memory://creds-test/run"
    a = ckpt.begin(root, step=1, storage_options={"secret_token": secret})
    report = ckpt.write_shards(a, {"x": torch.ones(2)}, storage_options={"secret_token": secret})
    m = ckpt.commit(a, [report], storage_options={"secret_token": secret})
    assert secret.encode() not in pickle.dumps(a)  # what Ray would send to workers
    assert secret not in repr(report)
    assert secret.encode() not in m.to_json()
    with pytest.raises(ckpt.PlanError, match="embeds credentials"):
        ckpt.begin("s3://user:pass@bucket/x", step=1)


def test_single_process_example_runs_end_to_end(tmp_path: pathlib.Path) -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "single_process.py"), "--root", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "bit-identical" in out.stdout
    assert ckpt.list_steps(str(tmp_path / "demo")) == [5, 10]


@pytest.mark.ray
@pytest.mark.s3
def test_ray_demo_against_the_s3_endpoint(s3_endpoint: str) -> None:
    """The `make demo` program, pointed at an s3:// root: 4 actors save, 3 actors resume."""
    import uuid

    import fsspec

    bucket = f"ckpt-demo-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "demo-key", "AWS_SECRET_ACCESS_KEY": "demo-secret"}
    fsspec.filesystem("s3", endpoint_url=s3_endpoint, key="demo-key", secret="demo-secret",
                      skip_instance_cache=True).call_s3("create_bucket", Bucket=bucket)  # fmt: skip
    root = f"s3://{bucket}/run"
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "ray_demo.py"), "--root", root, "--endpoint-url", s3_endpoint],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: the loss curve on 3 actors matches" in out.stdout
    opts = {"endpoint_url": s3_endpoint, "key": "demo-key", "secret": "demo-secret", "skip_instance_cache": True}
    assert ckpt.list_steps(root, storage_options=opts) == [5, 10]
    assert ckpt.read_manifest(root, storage_options=opts).world_size == 4


def test_the_wheel_ships_py_typed(tmp_path: pathlib.Path) -> None:
    """PEP 561: the marker is in the wheel, so users' type checkers read ckpt's annotations."""
    import importlib.util
    import subprocess
    import sys
    import zipfile

    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment (the wheel is built without isolation)")
    import shutil

    repo = pathlib.Path(__file__).resolve().parents[2]
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ there, and reuse it
    shutil.copytree(repo / "ckpt", src / "ckpt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (repo / name).exists():
            shutil.copy(repo / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)  # fmt: skip
    if done.returncode != 0 and "setuptools" in done.stderr:
        pytest.skip(f"this environment's setuptools cannot build the wheel: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("ckpt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ckpt/py.typed" in names
    assert "ckpt/dcp/__init__.py" in names
