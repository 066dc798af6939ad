"""A damaged newest step: ``ckpt.restore`` raises unless asked to fall back; the manager falls
back by default on resume (with a warning naming the step and why), never saves over the damaged
step, and an explicit step never falls back. And ``restore(target=)`` assigns the saved non-tensor
values into the target, as ``CheckpointManager.restore`` does."""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.full((256, 64), float(step)), "b": torch.arange(10) * step, "meta": {"step": step}}


def _target() -> dict[str, Any]:
    return {"w": torch.zeros(256, 64), "b": torch.zeros(10, dtype=torch.int64), "meta": {"step": -1}}


def _shard_file(root: Path, step: int) -> Path:
    return root / next(iter(ckpt.read_manifest(str(root), step).files))


def _damage(root: Path, step: int, kind: str) -> None:
    """Damage ``step``'s data the ways a new user met: same-size wrong bytes, a file from another
    step swapped in, a link, a FIFO, a missing or truncated file."""
    f = _shard_file(root, step)
    os.chmod(f, 0o644)
    if kind == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) - 100] ^= 0xFF
        f.write_bytes(bytes(data))
    elif kind == "swap":  # same shapes, same size: only the checksums tell
        other = _shard_file(root, 5)
        assert other.stat().st_size == f.stat().st_size
        f.unlink()
        shutil.copyfile(other, f)
    elif kind == "link":
        copy_ = root.parent / "copy.safetensors"
        shutil.copyfile(f, copy_)
        f.unlink()
        os.symlink(copy_, f)
    elif kind == "fifo":
        f.unlink()
        os.mkfifo(f)
    elif kind == "missing":
        f.unlink()
    elif kind == "truncate":
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size - 8)
    else:
        raise AssertionError(kind)


def _saved(root: Path, steps: tuple[int, ...] = (5, 10)) -> None:
    for s in steps:
        ckpt.save(str(root), _state(s), step=s)


KINDS = ["flip", "swap", "link", "fifo", "missing", "truncate"]


@pytest.mark.parametrize("kind", KINDS)
def test_restore_raises_on_damaged_newest_data_and_falls_back_when_asked(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "run"
    _saved(root)
    _damage(root, 10, kind)
    with pytest.raises((ckpt.CorruptCheckpointError, ckpt.ManifestError)):
        ckpt.restore(str(root))  # the default: damaged data of the newest step is an error
    with pytest.warns(ckpt.CkptWarning, match=r"skipping damaged step 10, falling back"):
        back = ckpt.restore(str(root), fallback=True)
    assert back["meta"] == {"step": 5}
    assert torch.equal(back["w"], torch.full((256, 64), 5.0))
    with pytest.raises((ckpt.CorruptCheckpointError, ckpt.ManifestError)):
        ckpt.restore(str(root), 10, fallback=True)  # an explicit step never falls back


def test_fallback_fills_a_target_from_the_intact_step_only(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _saved(root)
    _damage(root, 10, "flip")
    target = _target()
    w = target["w"]
    with pytest.warns(ckpt.CkptWarning, match="step 10"):
        ckpt.restore(str(root), target=target, fallback=True)
    assert target["w"] is w
    assert torch.equal(w, torch.full((256, 64), 5.0))
    assert torch.equal(target["b"], torch.arange(10) * 5)
    assert target["meta"] == {"step": 5}


def test_no_intact_step_is_an_error_naming_each_step_and_why(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _saved(root)
    _damage(root, 10, "flip")
    _damage(root, 5, "missing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckpt.CkptWarning)
        with pytest.raises(ckpt.NoIntactCheckpointError, match=r"step 10 \(ChecksumMismatchError.*step 5 \(MissingShardError"):
            ckpt.restore(str(root), fallback=True)
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.restore(str(tmp_path / "empty"), fallback=True)


def test_the_manager_resumes_from_the_newest_intact_step_and_does_not_save_over_the_damaged_one(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    _saved(root)
    _damage(root, 10, "flip")
    opts = ckpt.ManagerOptions(save_every=5, async_save=False, retention=ckpt.RetentionPolicy(keep_last=None))
    target = _target()
    mgr = ckpt.CheckpointManager(str(root), opts)
    with pytest.warns(ckpt.CkptWarning, match=r"skipping damaged step 10.*ChecksumMismatchError"):
        step = mgr.restore(target)
    assert step == 5
    assert target["meta"] == {"step": 5}
    with pytest.warns(ckpt.CkptWarning, match=r"step 10 is committed but damaged"):
        assert mgr.save(10, _state(10)) is False  # not CheckpointExistsError: the job goes on
    assert mgr.save(15, _state(15))
    mgr.close()
    assert ckpt.list_steps(str(root)) == [5, 10, 15]
    with ckpt.CheckpointManager(str(root), opts) as again:
        assert again.restore(_target()) == 15  # the next resume needs no fallback


def test_the_manager_without_fallback_and_an_explicit_step_raise(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _saved(root)
    _damage(root, 10, "swap")
    strict = ckpt.ManagerOptions(restore_fallback=False)
    with ckpt.CheckpointManager(str(root), strict) as mgr, pytest.raises(ckpt.ChecksumMismatchError):
        mgr.restore(_target())
    with ckpt.CheckpointManager(str(root)) as mgr, pytest.raises(ckpt.ChecksumMismatchError):
        mgr.restore(_target(), step=10)


def test_a_storage_failure_is_not_taken_for_damage(tmp_path: Path) -> None:
    """Only the restore's integrity checks send it back a step: a target that does not match the
    checkpoint is the caller's error, raised at once."""
    root = tmp_path / "run"
    _saved(root)
    wrong = _target()
    wrong["w"] = torch.zeros(3, 3)
    with pytest.raises(ckpt.TargetMismatchError):
        ckpt.restore(str(root), target=wrong, fallback=True)


# --- restore(target=) and mgr.restore(target) agree --------------------------------------------


def _training_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return model, opt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 7, "tags": ["a", "b"]}


def test_restore_into_a_target_assigns_its_non_tensor_values_like_the_manager(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _, _, saved = _training_state()
    saved["optimizer"]["param_groups"][0]["lr"] = 0.5
    ckpt.save(str(root), saved, step=1)

    results = []
    for how in ("restore", "manager"):
        _, _, state = _training_state()  # fresh hyper-parameters, epoch 7 -> the saved ones
        state["optimizer"]["param_groups"][0]["lr"] = 1e-3
        state["epoch"] = 0
        state["tags"] = ["x"]
        moment = state["optimizer"]["state"][0]["exp_avg"]
        if how == "restore":
            ckpt.restore(str(root), target=state)
        else:
            with ckpt.CheckpointManager(str(root)) as mgr:
                assert mgr.restore(state) == 1
        assert state["optimizer"]["param_groups"][0]["lr"] == 0.5, how
        assert state["epoch"] == 7, how
        assert state["tags"] == ["a", "b"], how
        assert state["optimizer"]["state"][0]["exp_avg"] is moment, how  # tensors filled in place
        assert torch.equal(moment, saved["optimizer"]["state"][0]["exp_avg"]), how
        results.append(copy.deepcopy({k: v for k, v in state.items() if k != "model"}))
    assert results[0]["epoch"] == results[1]["epoch"]
    assert results[0]["optimizer"]["param_groups"] == results[1]["optimizer"]["param_groups"]
