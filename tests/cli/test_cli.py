"""The ckpt command line: ls / show / verify, human and --json output, exit codes, storage
options (never printed), and ``python -m ckpt`` in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.cli import main
from ckpt.format.manifest import Manifest
from ckpt.units import human_size
from tests.conftest import Store

REPO = Path(__file__).resolve().parents[2]


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(32, 8, generator=g), "b": torch.zeros(8, dtype=torch.bfloat16)},
        "step": seed,
        "lr": 0.5,
    }


def _save(store: Store, step: int, **kw: Any) -> Manifest:
    return ckpt.save(store.root, _state(step), step=step, storage_options=store.opts, **kw)


def _opts(store: Store) -> list[str]:
    out = []
    for k, v in store.opts.items():
        out += ["--storage-option", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _write_bad_manifest(root: str, step: int, data: bytes = b'{"format_version": 1,') -> None:
    path = Path(root, f"steps/{step:012d}/manifest.json")
    path.parent.mkdir(parents=True)
    path.write_bytes(data)


def _flip_data_byte(root: str, m: Manifest, key: str) -> str:
    shard = m.tensors[key].shards[0]
    with open(os.path.join(root, shard.file), "r+b") as f:
        f.seek(shard.byte_range.start)
        b = f.read(1)
        f.seek(shard.byte_range.start)
        f.write(bytes([b[0] ^ 0x80]))
    return shard.file


def test_human_size() -> None:
    assert human_size(0) == "0 B"
    assert human_size(1023) == "1023 B"
    assert human_size(1024) == "1.0 KiB"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(int(1.2 * 2**30)) == "1.2 GiB"
    assert human_size(5 * 2**60) == "5120.0 PiB"


def test_size_options_read_5gb_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`5GB` is 5*10**9 bytes for `cp --limit-rate` as for `export --max-shard-size` (cp once
    read it as 5*2**30): both reach the library through the real argument handling."""
    from ckpt.interop import hf
    from ckpt.lifecycle import copy as copier

    seen: dict[str, int] = {}

    def fake_copy(*args: Any, options: Any, **kwargs: Any) -> Any:
        seen["--limit-rate"] = options.max_bytes_per_s
        raise ckpt.CheckpointNotFoundError("stopped by the test")

    def fake_export_hf(*args: Any, max_shard_bytes: int, **kwargs: Any) -> Any:
        seen["--max-shard-size"] = max_shard_bytes
        raise ckpt.CheckpointNotFoundError("stopped by the test")

    monkeypatch.setattr(copier, "copy", fake_copy)
    monkeypatch.setattr(hf, "export_hf", fake_export_hf)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    assert _run(capsys, "cp", src, dst, "--limit-rate", "5GB")[0] == 3
    assert _run(capsys, "export", "--format", "hf", src, dst, "--max-shard-size", "5GB")[0] == 3
    assert seen == {"--limit-rate": 5_000_000_000, "--max-shard-size": 5_000_000_000}


# --- ls ------------------------------------------------------------------------------------------


def test_ls_lists_every_step_on_every_backend(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    m1 = _save(store, 1)
    _save(store, 5)
    rc, out, err = _run(capsys, "ls", store.root, *_opts(store))
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["STEP", "CREATED", "SIZE", "TENSORS", "FILES", "WORLD"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "5"]
    assert lines[1].split()[1:] == [m1.created, *human_size(m1.total_bytes).split(), "2", "1", "1"]


def test_ls_json(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    m = _save(store, 3)
    rc, out, _ = _run(capsys, "ls", store.root, "--json", *_opts(store))
    assert rc == 0
    doc = json.loads(out)
    assert doc["root"].endswith("run")
    assert doc["steps"] == [
        {
            "step": 3,
            "valid": True,
            "created": m.created,
            "attempt": m.attempt,
            "total_bytes": m.total_bytes,
            "num_tensors": 2,
            "num_files": 1,
            "num_objects": 2,
            "world_size": 1,
            "problem": None,
        }
    ]


def test_ls_shows_an_invalid_manifest_as_invalid(
    local_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    _save(local_store, 1)
    _write_bad_manifest(local_store.root, 2)
    rc, out, _ = _run(capsys, "ls", local_store.root)
    assert rc == 0
    row = out.splitlines()[2].split()
    assert row[:2] == ["2", "INVALID"]
    assert "invalid JSON" in out.splitlines()[2]
    rc, out, _ = _run(capsys, "ls", local_store.root, "--json")
    bad = json.loads(out)["steps"][1]
    assert bad["step"] == 2
    assert bad["valid"] is False
    assert bad["total_bytes"] is None
    assert bad["problem"]["error"] == "ManifestParseError"
    assert "invalid JSON" in bad["problem"]["message"]


def test_ls_empty_root_is_not_found(local_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "ls", local_store.root, "--json")
    assert (rc, out) == (3, "")
    assert err.startswith("ckpt: error: ")
    assert "no checkpoints" in err


# --- show ----------------------------------------------------------------------------------------


def test_show_human(local_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    m = _save(local_store, 4, user_metadata={"job": "llama"})
    _save(local_store, 9)
    rc, out, _ = _run(capsys, "show", local_store.root, "--step", "4")
    assert rc == 0
    assert "step            4\n" in out
    assert f"attempt         {m.attempt}\n" in out
    assert "user_metadata   job = llama\n" in out
    (path,) = m.files
    assert any(
        line.split() == [path, *human_size(m.files[path].size).split()] for line in out.splitlines()
    )
    assert any(
        line.split() == ["model/w", "F32", "[32,", "8]", "1", "1.0", "KiB"]
        for line in out.splitlines()
    )
    assert any(
        line.split() == ["model/b", "BF16", "[8]", "1", "16", "B"] for line in out.splitlines()
    )
    objects = out.split("objects (2):\n", 1)[1]
    assert sorted(objects.splitlines()) == ["  lr", "  step"]
    rc, out2, _ = _run(capsys, "show", f"{local_store.root}@4")  # ROOT@STEP
    assert (rc, out2) == (0, out)
    rc, out, _ = _run(capsys, "show", local_store.root)  # default: the latest
    assert "step            9\n" in out


def test_show_escapes_control_characters(
    local_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    _save(local_store, 1, user_metadata={"note": "a\x1b[31mred\nline"})
    rc, out, _ = _run(capsys, "show", local_store.root)
    assert rc == 0
    assert "\x1b" not in out
    assert "user_metadata   note = a\\x1b[31mred\\nline\n" in out
    rc, out, _ = _run(capsys, "show", local_store.root, "--json")
    assert json.loads(out)["user_metadata"] == {"note": "a\x1b[31mred\nline"}  # JSON: exact


def test_show_json(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    m = _save(store, 2, user_metadata={"a": "b"})
    rc, out, _ = _run(capsys, "show", store.root, "--json", *_opts(store))
    assert rc == 0
    doc = json.loads(out)
    assert {k: doc[k] for k in ("step", "attempt", "created", "format_version", "world_size")} == {
        "step": 2,
        "attempt": m.attempt,
        "created": m.created,
        "format_version": 1,
        "world_size": 1,
    }
    assert doc["user_metadata"] == {"a": "b"}
    assert doc["total_bytes"] == m.total_bytes
    assert doc["files"] == [
        {"path": p, "size": f.size, "crc32c": f.crc32c} for p, f in m.files.items()
    ]
    want = {
        "model/w": {
            "key": "model/w",
            "dtype": "F32",
            "shape": [32, 8],
            "num_shards": 1,
            "nbytes": 1024,
        },
        "model/b": {"key": "model/b", "dtype": "BF16", "shape": [8], "num_shards": 1, "nbytes": 16},
    }
    assert doc["tensors"] == [want[k] for k in m.tensors]  # in manifest order
    assert sorted(doc["objects"]) == ["lr", "step"]


def test_show_missing_step_exits_3_and_bad_manifest_exits_4(
    local_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    _save(local_store, 1)
    rc, out, err = _run(capsys, "show", local_store.root, "--step", "7", "--json")
    assert (rc, out) == (3, "")
    assert err == f"ckpt: error: {local_store.root}: no committed checkpoint for step 7\n"
    _write_bad_manifest(local_store.root, 2, b"\xff")
    rc, out, err = _run(capsys, "show", local_store.root, "--step", "2")
    assert (rc, out) == (4, "")
    assert err.startswith("ckpt: error: ")
    assert "not UTF-8" in err
    assert "Traceback" not in err
    rc, out, err = _run(capsys, "show", local_store.root)  # the latest valid one, with a warning
    assert rc == 0
    assert "step            1\n" in out
    assert err.startswith("ckpt: warning: skipping step 2: ")


# --- verify --------------------------------------------------------------------------------------


def test_verify_ok(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    m = _save(store, 1)
    rc, out, err = _run(capsys, "verify", store.root, *_opts(store))
    assert (rc, err) == (0, "")
    assert out == f"step 1: OK (1 file, {human_size(m.total_bytes)}, 2 blocks checked)\n"
    rc, out, err = _run(capsys, "verify", store.root, "--json", *_opts(store))
    assert (rc, err) == (0, "")  # no progress bar with --json
    assert json.loads(out) == {
        "root": json.loads(out)["root"],
        "ok": True,
        "steps": [
            {
                "step": 1,
                "ok": True,
                "manifest_valid": True,
                "files_checked": 1,
                "bytes_read": m.total_bytes,
                "blocks_checked": 2,
                "problems": [],
            }
        ],
    }


def test_verify_quick(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    """``--quick``: no data read; on S3 the store's crc32c of the file is checked, elsewhere
    its size only (and the line says so)."""
    m = _save(store, 1)
    rc, out, err = _run(capsys, "verify", store.root, "--quick", *_opts(store))
    assert (rc, err) == (0, "")
    checked = "step 1: OK (1 file: sizes and the store's crc32c checked, no data read"
    by_size = "" if store.kind == "s3" else "; 1 by size only (the store keeps no crc32c for them)"
    assert out == f"{checked}{by_size})\n"
    rc, out, err = _run(capsys, "verify", store.root, "--quick", "--json", *_opts(store))
    assert (rc, err) == (0, "")
    (doc,) = json.loads(out)["steps"]
    assert (doc["ok"], doc["quick"], doc["bytes_read"]) == (True, True, 0)
    assert doc["size_only"] == ([] if store.kind == "s3" else sorted(m.files))


def test_verify_corrupt_exits_1_naming_file_and_key(
    local_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    m = _save(local_store, 1)
    path = _flip_data_byte(local_store.root, m, "model/w")
    rc, out, _ = _run(capsys, "verify", local_store.root)
    assert rc == 1
    lines = out.splitlines()
    assert lines[0].startswith("step 1: FAILED, 2 problems")
    assert lines[1].startswith("  ChecksumMismatchError: ")
    assert path in lines[1]
    assert "key 'model/w'" in lines[1]
    rc, out, _ = _run(capsys, "verify", local_store.root, "--step", "1", "--json")
    assert rc == 1
    doc = json.loads(out)
    assert doc["ok"] is False
    (step,) = doc["steps"]
    assert step["ok"] is False
    assert [(p["error"], p["file"], p["key"]) for p in step["problems"]] == [
        ("ChecksumMismatchError", path, "model/w"),
        ("ChecksumMismatchError", path, None),
    ]
    assert all(path in p["message"] for p in step["problems"])


def test_verify_missing_step_exits_3(
    local_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _run(capsys, "verify", local_store.root)
    assert (rc, out) == (3, "")
    assert "no committed checkpoint" in err
    _save(local_store, 1)
    rc, _, err = _run(capsys, "verify", f"{local_store.root}@2")
    assert rc == 3
    assert "step 2" in err


def test_verify_all(local_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    _save(local_store, 1)
    m2 = _save(local_store, 2)
    rc, out, _ = _run(capsys, "verify", local_store.root, "--all")
    assert rc == 0
    assert [line.split(":")[0] for line in out.splitlines()] == ["step 1", "step 2"]
    _write_bad_manifest(local_store.root, 3)
    rc, out, _ = _run(capsys, "verify", local_store.root, "--step", "3")
    assert rc == 4  # one step asked for, and its manifest is bad
    rc, out, _ = _run(capsys, "verify", local_store.root, "--all")
    assert rc == 1
    assert "step 3: INVALID manifest\n  ManifestParseError: " in out
    _flip_data_byte(local_store.root, m2, "model/b")
    rc, out, _ = _run(capsys, "verify", local_store.root, "--all", "--json")
    assert rc == 1
    steps = json.loads(out)["steps"]
    assert [(s["step"], s["ok"], s["manifest_valid"]) for s in steps] == [
        (1, True, True),
        (2, False, True),
        (3, False, False),
    ]
    assert steps[1]["problems"][0]["key"] == "model/b"
    assert steps[2]["problems"][0]["file"] == "steps/000000000003/manifest.json"


def test_usage_errors_exit_2(local_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [],
        ["frobnicate", local_store.root],
        ["verify", local_store.root, "--step", "1", "--all"],
        ["verify", local_store.root, "--step", "-3"],
        ["show", f"{local_store.root}@1", "--step", "2"],
        ["--storage-option", "novalue", "ls", local_store.root],
    ):
        rc, out, err = _run(capsys, *argv)
        assert rc == 2, argv
        assert out == ""
        assert "usage: ckpt" in err
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0
    assert "Exit codes" in out


def test_other_errors_exit_4_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "ls", "nosuchprotocol://bucket/run")
    assert (rc, out) == (4, "")
    assert (
        err
        == "ckpt: error: cannot open 'nosuchprotocol://bucket/run': Protocol not known: nosuchprotocol\n"
    )


# --- storage options -----------------------------------------------------------------------------


@pytest.mark.s3
def test_storage_options_reach_s3_and_are_never_printed(
    s3_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    _save(s3_store, 1)
    endpoint = s3_store.opts["endpoint_url"]
    secret = ["--storage-option", "secret=testing-secret"]
    argv = [
        "--storage-option",
        "key=testing-key",
        *secret,
        "--storage-option",
        f"endpoint_url={endpoint}",
    ]
    argv += ["--storage-option", "skip_instance_cache=true"]  # JSON: a bool
    rc, out, err = _run(capsys, *argv, "verify", s3_store.root)
    assert (rc, err) == (0, "")
    assert out.startswith("step 1: OK")
    for cmd in (["ls"], ["show"], ["verify", "--json"]):
        rc, out, err = _run(capsys, *argv, cmd[0], s3_store.root, *cmd[1:])
        assert rc == 0
        assert "testing-secret" not in out + err
        assert "testing-key" not in out + err
    # an option the backend refuses: exit 4, one line, no traceback, no values
    rc, out, err = _run(capsys, *argv, "--storage-option", "bogus=hush", "ls", s3_store.root)
    assert (rc, out) == (4, "")
    assert err.startswith("ckpt: error: ")
    assert "TypeError" in err
    assert "'bogus'" in err
    assert "hush" not in err
    assert "testing-secret" not in err
    # a failing run: still no secret in what is printed
    bucket_gone = s3_store.root.replace("s3://", "s3://no-such-bucket-")
    rc, out, err = _run(
        capsys,
        "ls",
        bucket_gone,
        *secret,
        "--storage-option",
        "key=testing-key",
        "--storage-option",
        f"endpoint_url={endpoint}",
    )
    assert rc in (3, 4)
    assert "testing-secret" not in out + err
    assert "Traceback" not in err


# --- a real process ------------------------------------------------------------------------------


def test_python_m_ckpt_in_a_subprocess(local_store: Store) -> None:
    m = _save(local_store, 6)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ckpt", *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    p = run("verify", local_store.root, "--json")
    assert (p.returncode, p.stderr) == (0, "")
    assert json.loads(p.stdout)["steps"][0]["bytes_read"] == m.total_bytes
    p = run("ls", local_store.root)
    assert p.returncode == 0
    assert p.stdout.splitlines()[1].split()[0] == "6"
    _flip_data_byte(local_store.root, m, "model/w")
    p = run("verify", local_store.root)
    assert p.returncode == 1
    assert "key 'model/w'" in p.stdout
    closed = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "show", local_store.root, "--json"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert closed.stdout is not None
    closed.stdout.close()  # like `ckpt show ... | head -0`
    _, err = closed.communicate(timeout=120)
    assert (closed.returncode, err) == (141, "")
    p = run("show", local_store.root, "--step", "99")
    assert p.returncode == 3
    assert p.stderr.startswith("ckpt: error: ")
    assert "Traceback" not in p.stderr


# --- rm ----------------------------------------------------------------------------------------


def test_rm_dry_run_deletes_nothing(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    for s in (1, 2, 3):
        _save(store, s)
    code, out, _ = _run(capsys, "rm", store.root, "1", "2", "--dry-run", *_opts(store))
    assert code == 0
    assert "would retire step 1: would delete 1 data file" in out
    assert ckpt.list_steps(store.root, storage_options=store.opts) == [1, 2, 3]
    assert ckpt.verify(store.root, 1, storage_options=store.opts).ok


def test_rm_retires_manifest_and_data(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    ms = {s: _save(store, s) for s in (1, 2, 3)}
    code, out, _ = _run(capsys, "rm", store.root, "2", "--json", *_opts(store))
    assert code == 0
    doc = json.loads(out)
    assert doc["retired"] == [{"step": 2, "files_deleted": sorted(ms[2].files), "files_kept": []}]
    assert ckpt.list_steps(store.root, storage_options=store.opts) == [1, 3]
    import fsspec

    fs, path = fsspec.core.url_to_fs(store.root, **store.opts)
    for f in ms[2].files:
        assert not fs.exists(f"{path}/{f}")
    for s in (1, 3):
        assert ckpt.verify(store.root, s, storage_options=store.opts).ok


def test_rm_of_a_missing_step_exits_3_and_deletes_nothing(local_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    _save(local_store, 1)
    code, _, err = _run(capsys, "rm", local_store.root, "1", "7")
    assert code == 3
    assert "step 7" in err
    assert ckpt.list_steps(local_store.root) == [1]
