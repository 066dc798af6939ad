"""Zarr v3 archives: export a checkpoint, read it with plain zarr (no ckpt), import it back
bitwise identical."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckpt
from ckpt.cli import main
from ckpt.interop import _read as interop
from ckpt.interop.zarr import STORED, chunk_shape, export_zarr, import_zarr
from tests.lifecycle.test_save_restore import ALL_DTYPES, _random

zarr = pytest.importorskip("zarr")


def _state() -> dict[str, Any]:
    od: OrderedDict[str, torch.Tensor] = OrderedDict((("w", _random(torch.float32, (40, 7), 9)), ("b", _random(torch.float32, (7,), 10))))
    od._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    return {
        "model": od,
        "all": {str(dt).removeprefix("torch."): _random(dt, (33, 5), i) for i, dt in enumerate(ALL_DTYPES)},
        "scalars": [_random(dt, (), 50 + i) for i, dt in enumerate(ALL_DTYPES)],
        "empty": _random(torch.bfloat16, (0, 4), 3),
        "negzero": torch.full((64,), -0.0),
        "zeros": torch.zeros(1000, 3, dtype=torch.bfloat16),
        "np": np.arange(12, dtype=np.int16).reshape(3, 4),
        "odd/key~": {"__dunder": torch.ones(3), "": torch.arange(4)},
        "objects": {"lr": 1e-3, "nan": float("nan"), "big": 2**64 + 1, "tag": b"\x00ckpt", "t": (1, "x"), 7: None},
        "step": 12,
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(_bits(a), _bits(b)), path
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


def test_round_trip_is_bitwise_identical(tmp_path: Path) -> None:
    state = _state()
    ckpt.save(str(tmp_path / "src"), state, step=12, user_metadata={"run": "demo", "ckpt.metric.loss": "0.5"})
    rep = export_zarr(str(tmp_path / "src"), str(tmp_path / "z"), chunk_bytes=256, slab_bytes=1024)
    assert rep.step == 12
    assert rep.num_tensors == len(ckpt.read_manifest(str(tmp_path / "src")).tensors)
    m = import_zarr(str(tmp_path / "z"), str(tmp_path / "dst"))
    assert m.step == 12
    assert m.user_metadata == {"run": "demo", "ckpt.metric.loss": "0.5"}
    _assert_same(ckpt.restore(str(tmp_path / "src")), ckpt.restore(str(tmp_path / "dst")))
    _assert_same(state, ckpt.restore(str(tmp_path / "dst")))  # the original, not only the reread
    assert ckpt.verify(str(tmp_path / "dst")).ok
    # a step of one's choosing; an existing step is refused
    import_zarr(str(tmp_path / "z"), str(tmp_path / "dst"), step=13, batch_bytes=1)
    _assert_same(state, ckpt.restore(str(tmp_path / "dst"), 13))
    with pytest.raises(ckpt.CheckpointExistsError):
        import_zarr(str(tmp_path / "z"), str(tmp_path / "dst"))


def test_export_streams_in_slabs_and_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = torch.arange(1000 * 16, dtype=torch.float32).reshape(1000, 16)  # 64 KB, rows of 64 B
    ckpt.save(str(tmp_path / "src"), {"big": big, "small": torch.ones(3)}, step=1)
    seen: list[int] = []
    real = interop.read_box

    def spy(*args: Any) -> torch.Tensor:
        out = real(*args)
        seen.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(interop, "read_box", spy)
    export_zarr(str(tmp_path / "src"), str(tmp_path / "z"), chunk_bytes=4096, slab_bytes=16384)
    assert max(seen) <= 16384
    assert sum(seen) == big.numel() * 4 + 12
    arr = zarr.open_group(str(tmp_path / "z"), mode="r")["tensors/big"]
    assert arr.chunks == (64, 16)
    assert torch.equal(torch.from_numpy(arr[...]), big)


def test_chunk_shape() -> None:
    assert chunk_shape((1000, 16), 4, 4096) == (64, 16)
    assert chunk_shape((4, 2000), 4, 4096) == (1, 1024)
    assert chunk_shape((), 4, 4096) == ()
    assert chunk_shape((0, 3), 2, 4096) == (1, 3)


def test_plain_zarr_reads_the_archive_without_ckpt(tmp_path: Path) -> None:
    """A subprocess with no ckpt importable (isolated mode, no site processing, so not the
    editable install either) opens the group with plain zarr and finds every tensor, its
    original dtype, the plain data and the user metadata."""
    state = _state()
    ckpt.save(str(tmp_path / "src"), state, step=12, user_metadata={"run": "demo"})
    export_zarr(str(tmp_path / "src"), str(tmp_path / "z"))
    m = ckpt.read_manifest(str(tmp_path / "src"))
    restored = ckpt.restore(str(tmp_path / "src"))
    expected: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    flat = {k: v for k, v in _flatten(restored)}
    for i, (key, entry) in enumerate(m.tensors.items()):
        t = flat[key]
        t = torch.from_numpy(t) if isinstance(t, np.ndarray) else t
        _stored, bits = STORED[entry.dtype]
        if bits:
            t = t.view({1: torch.uint8, 2: torch.uint16}[t.element_size()])
        expected[f"t{i}"] = t.numpy()
        names[f"t{i}"] = key
    np.savez(tmp_path / "expected.npz", **expected)
    (tmp_path / "names.json").write_text(json.dumps({"names": names, "dtypes": {k: m.tensors[k].dtype for k in names.values()}}))
    script = textwrap.dedent(
        """
        import json, sys
        sys.path[:0] = sys.argv[2:]
        try:
            import ckpt
        except ImportError:
            pass
        else:
            raise SystemExit("ckpt is importable: the test proves nothing")
        import numpy as np
        import zarr
        d = sys.argv[1]
        g = zarr.open_group(d + "/z", mode="r")
        info = g.attrs["ckpt"]
        meta = json.load(open(d + "/names.json"))
        with np.load(d + "/expected.npz") as exp:
            for name, key in meta["names"].items():
                t = info["tensors"][key]
                arr = g[t["array"]]
                assert t["dtype"] == meta["dtypes"][key] == arr.attrs["ckpt"]["dtype"], key
                got = arr[...] if arr.shape else np.asarray(arr[()])
                assert got.dtype == exp[name].dtype and got.shape == exp[name].shape, key
                assert got.tobytes() == exp[name].tobytes(), key
        assert g[info["tensors"]["all/bfloat16"]["array"]].dtype == np.uint16
        assert info["user_metadata"] == {"run": "demo"}
        assert info["objects"]["step"] == 12
        assert info["step"] == 12
        print("OK", len(meta["names"]))
        """
    )
    (tmp_path / "read.py").write_text(script)
    site = sysconfig.get_paths()["purelib"]
    out = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "read.py"), str(tmp_path), site],
                         capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("OK")


def _flatten(x: Any, path: str = "") -> list[tuple[str, Any]]:
    from ckpt.state.tree import join

    if isinstance(x, torch.Tensor | np.ndarray):
        return [(path, x)]
    if isinstance(x, dict):
        return [kv for k, v in x.items() for kv in _flatten(v, join(path, k))]
    if isinstance(x, list | tuple):
        return [kv for i, v in enumerate(x) for kv in _flatten(v, join(path, i))]
    return []


def test_import_refuses_what_is_not_an_archive(tmp_path: Path) -> None:
    g = zarr.open_group(str(tmp_path / "z"), mode="w-", zarr_format=3)
    g.attrs["ckpt"] = {"format": "something else"}
    with pytest.raises(ckpt.ManifestSchemaError, match="not a ckpt Zarr archive"):
        import_zarr(str(tmp_path / "z"), str(tmp_path / "dst"))
    ckpt.save(str(tmp_path / "src"), {"w": torch.ones(4, dtype=torch.bfloat16)}, step=1)
    export_zarr(str(tmp_path / "src"), str(tmp_path / "z2"))
    g2 = zarr.open_group(str(tmp_path / "z2"), mode="r+")
    info = dict(g2.attrs["ckpt"])
    info["tensors"] = {"w": {**info["tensors"]["w"], "dtype": "F16"}}  # uint16 stored, float16 claimed
    g2.attrs["ckpt"] = info
    with pytest.raises(ckpt.PlanError, match="should be float16"):
        import_zarr(str(tmp_path / "z2"), str(tmp_path / "dst"))
    assert ckpt.list_steps(str(tmp_path / "dst")) == []


def test_cli_export_and_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _state()
    ckpt.save(str(tmp_path / "src"), state, step=3)
    ckpt.save(str(tmp_path / "src"), {"x": torch.ones(1)}, step=4)
    assert main(["export", "--format", "zarr", f"{tmp_path / 'src'}@3", str(tmp_path / "z"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["step"] == 3
    assert doc["format"] == "zarr"
    assert main(["import", "--format", "zarr", str(tmp_path / "z"), str(tmp_path / "dst"), "--step", "30"]) == 0
    assert "imported step 30" in capsys.readouterr().out
    _assert_same(state, ckpt.restore(str(tmp_path / "dst"), 30))
    assert main(["export", "--format", "zarr", str(tmp_path / "nowhere"), str(tmp_path / "z3")]) == 3
