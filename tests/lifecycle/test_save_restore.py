"""End-to-end save/restore on every backend: structure, types and bits come back exactly."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest
import torch

import ckpt
from tests.conftest import Store, make_state

ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
    torch.uint16, torch.uint32, torch.uint64, torch.complex64,
]  # fmt: skip


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (math.prod(shape) * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2  # only 0 and 1 are bools (torch normalises others on copy)
    return raw.view(dtype).reshape(shape)


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bitwise and type-exact equality of two states."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, path
        assert a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    elif isinstance(a, float):
        assert a == b, path
        assert math.copysign(1, a) == math.copysign(1, b), path
    else:
        assert a == b, path


def test_training_state_round_trips(store: Store) -> None:
    state = make_state()
    m = ckpt.save(store.root, state, step=7, storage_options=store.opts)
    assert m.step == 7
    assert ckpt.list_steps(store.root, storage_options=store.opts) == [7]
    assert ckpt.latest_step(store.root, storage_options=store.opts) == 7
    assert_same(ckpt.restore(store.root, storage_options=store.opts), state)


def test_restored_optimizer_and_rng_resume_identically() -> None:
    state = make_state(seed=1)
    tmp = f"memory://resume-{random.randrange(1 << 30)}"
    ckpt.save(tmp, state, step=1)
    back = ckpt.restore(tmp)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model.load_state_dict(back["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(back["optimizer"])
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy"])
    torch.set_rng_state(back["rng"]["torch"])
    assert random.random() == (random.setstate(state["rng"]["python"]), random.random())[1]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_bitwise(dtype: torch.dtype, memory_store: Store) -> None:
    state = {
        "x": _random(dtype, (3, 5), 1),
        "scalar": _random(dtype, (), 2),
        "empty": _random(dtype, (0, 4), 3),
        "strided": _random(dtype, (6, 4), 4)[::2, 1:],
    }
    assert not state["strided"].is_contiguous()
    ckpt.save(memory_store.root, state, step=0)
    back = ckpt.restore(memory_store.root)
    assert_same(back, {k: v.contiguous() for k, v in state.items()})


def test_plain_data_round_trips(memory_store: Store) -> None:
    state = {
        "ints": [0, -1, 2**53, -(2**53), 2**200, -(3**150)],
        "floats": [0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 1e-310, 1.0],
        "strings": ["", "ünïcødé", "a/b~c", "\x00\n"],
        "bytes": b"\x00\xff" * 10,
        "none": None,
        "bools": (True, False),
        "nested": {1: {"a": (1, [2, (3,)])}, -5: [], "1": {}},
        "np_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True)],
        "tensor_in_tuple": (torch.arange(3), "x"),
    }
    ckpt.save(memory_store.root, state, step=1)
    assert_same(ckpt.restore(memory_store.root), state)


@pytest.mark.parametrize(
    "bad",
    [lambda: None, object(), {1.5: 1}, {"s": {1, 2}}, torch.randn(2).to_sparse(), complex(1, 2)],
    ids=["lambda", "object", "float-key", "set", "sparse", "complex"],
)
def test_unsaveable_values_are_refused_with_key_path(bad: Any, memory_store: Store) -> None:
    state = {"outer": {"inner": [0, bad]}}
    with pytest.raises(ckpt.StateError, match="outer/inner"):
        ckpt.save(memory_store.root, state, step=0)
    assert ckpt.list_steps(memory_store.root) == []


def test_restore_subset_reads_only_requested_keys(memory_store: Store) -> None:
    state = {"model": {"w": torch.randn(64, 64), "b": torch.randn(64)}, "opt": {"m": torch.randn(4096)}, "step": 3}
    ckpt.save(memory_store.root, state, step=2)
    back = ckpt.restore(memory_store.root, target={"model": {"b": None}, "step": None})
    assert list(back) == ["model", "step"]
    assert list(back["model"]) == ["b"]
    assert torch.equal(back["model"]["b"], state["model"]["b"])
    assert back["step"] == 3


def test_restore_in_place_fills_target_tensors(memory_store: Store) -> None:
    state = {"w": torch.randn(32, 16), "n": np.arange(10, dtype=np.int32)}
    ckpt.save(memory_store.root, state, step=0)
    w = torch.zeros(32, 16)
    n = np.zeros(10, dtype=np.int32)
    ptr = w.data_ptr()
    back = ckpt.restore(memory_store.root, target={"w": w, "n": n})
    assert back["w"] is w
    assert w.data_ptr() == ptr
    assert back["n"] is n
    assert torch.equal(w, state["w"])
    assert (n == state["n"]).all()


def test_restore_into_non_contiguous_target(memory_store: Store) -> None:
    state = {"w": torch.randn(4, 6)}
    ckpt.save(memory_store.root, state, step=0)
    w = torch.zeros(6, 4).t()
    ckpt.restore(memory_store.root, target={"w": w})
    assert torch.equal(w, state["w"])


def test_target_mismatch_is_typed(memory_store: Store) -> None:
    ckpt.save(memory_store.root, {"w": torch.randn(4, 6)}, step=0)
    with pytest.raises(ckpt.TargetMismatchError, match="'w'"):
        ckpt.restore(memory_store.root, target={"w": torch.zeros(6, 4)})
    with pytest.raises(ckpt.TargetMismatchError, match="'w'"):
        ckpt.restore(memory_store.root, target={"w": torch.zeros(4, 6, dtype=torch.float16)})
    with pytest.raises(ckpt.MissingKeyError, match="'nope'"):
        ckpt.restore(memory_store.root, target={"nope": None})


def test_steps_are_listed_and_latest_is_newest(store: Store) -> None:
    for step in (3, 1, 10):
        ckpt.save(store.root, {"s": torch.tensor(step)}, step=step, storage_options=store.opts)
    assert ckpt.list_steps(store.root, storage_options=store.opts) == [1, 3, 10]
    assert ckpt.latest_step(store.root, storage_options=store.opts) == 10
    assert ckpt.restore(store.root, step=3, storage_options=store.opts)["s"].item() == 3
    assert ckpt.read_manifest(store.root, storage_options=store.opts).step == 10


def test_empty_root_has_no_checkpoint(store: Store) -> None:
    assert ckpt.list_steps(store.root, storage_options=store.opts) == []
    assert ckpt.latest_step(store.root, storage_options=store.opts) is None
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.restore(store.root, storage_options=store.opts)


def test_large_tensor_multi_file_and_multipart(store: Store) -> None:
    """Several files (max_file_bytes) and, on S3, multipart uploads of >10 MiB."""
    state = {"big": torch.randn(3 << 20), "small": torch.randn(10), "mid": torch.randn(1 << 20)}
    opts = ckpt.SaveOptions(max_file_bytes=8 << 20, block_bytes=1 << 20)
    m = ckpt.save(store.root, state, step=0, options=opts, storage_options=store.opts)
    assert len(m.files) >= 2
    assert_same(ckpt.restore(store.root, storage_options=store.opts), state)


def test_reserved_safetensors_key_is_refused(memory_store: Store) -> None:
    with pytest.raises(ckpt.StateError, match="__metadata__"):
        ckpt.save(memory_store.root, {"__metadata__": torch.ones(1)}, step=0)


def test_many_tiny_tensors_split_files_to_keep_headers_readable(memory_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt.engine import save_plan

    monkeypatch.setattr(save_plan, "_MAX_HEADER_PLAN_BYTES", 4096)
    state = {f"t{i:04d}": torch.full((1,), float(i)) for i in range(300)}
    m = ckpt.save(memory_store.root, state, step=0)
    assert len(m.files) > 1
    assert_same(ckpt.restore(memory_store.root), state)


def test_too_deep_states_are_refused_before_writing(memory_store: Store) -> None:
    deep: dict[str, Any] = {"t": torch.ones(1)}
    node = deep
    for _ in range(60):
        node["n"] = {"t": torch.ones(1)}
        node = node["n"]
    with pytest.raises(ckpt.StateError, match=r"key 'n/n/.*more than 128 JSON levels"):
        ckpt.save(memory_store.root, deep, step=0)
    plain: dict[str, Any] = {}
    node = plain
    for _ in range(100):
        node["n"] = {}
        node = node["n"]
    with pytest.raises(ckpt.StateError, match=r"key 'o': nested more than 128"):
        ckpt.save(memory_store.root, {"o": plain}, step=0)
    import fsspec

    assert not fsspec.filesystem("memory").exists(memory_store.root + "/data")  # nothing written
