"""The key mapping between DCP's FQNs and ckpt keys, and the typed encoding of DCP's non-tensor
values (pure functions of ckpt.dcp)."""

from __future__ import annotations

import argparse
import pathlib
from collections import OrderedDict

import pytest
import torch

import ckpt
from ckpt.dcp import _mapping, _values


def test_a_path_becomes_an_escaped_slash_joined_key() -> None:
    assert _mapping.key_of(("model", "fc.weight")) == "model/fc.weight"
    assert _mapping.key_of(("per/layer", "a~b", 0)) == "per~1layer/a~0b/0"
    assert _mapping.path_of("x.y", {}) == ("x.y",)  # no planner data: the FQN is one segment
    assert _mapping.paths({"a.b": ("a", "b")}) == {"a.b": ("a", "b")}
    assert _mapping.paths(None) == {}
    assert _mapping.paths({"a": "not a path"}) == {}


def test_the_tree_makes_lists_of_contiguous_indices_and_dicts_of_the_rest() -> None:
    leaves = [(("opt", "groups", 0, "lr"), "object", "opt/groups/0/lr"), (("opt", "groups", 1, "lr"), "object", "opt/groups/1/lr"),
              (("opt", "sparse", 3), "object", "opt/sparse/3"), (("w",), "tensor", "w")]  # fmt: skip
    assert _mapping.build_tree(leaves) == {"dict": [
        ["opt", {"dict": [
            ["groups", {"list": [{"dict": [["lr", {"object": "opt/groups/0/lr"}]]}, {"dict": [["lr", {"object": "opt/groups/1/lr"}]]}]}],
            ["sparse", {"dict": [[3, {"object": "opt/sparse/3"}]]}],
        ]}],
        ["w", {"tensor": "w"}],
    ]}  # fmt: skip
    with pytest.raises(ckpt.PlanError, match="both a value and a container"):
        _mapping.build_tree([(("a",), "tensor", "a"), (("a", "b"), "tensor", "a/b")])


@pytest.mark.parametrize(
    "value",
    [None, 3, 2**70, 0.5, float("-inf"), "s", b"\x00", [1, (2, 3)], {"a": {1: "b"}}, OrderedDict(x=1),
     torch.bfloat16, torch.device("cpu"), torch.Size([2, 3]), pathlib.Path("/a/b"), pathlib.PurePosixPath("a"),
     pathlib.PureWindowsPath("C:/x"), argparse.Namespace(a=1, b=[torch.float32]), {1, 2}, frozenset({"a"}),
     complex(1, 2), {"$dcp": "torch.dtype", "value": "float32"}],
)  # fmt: skip
def test_typed_values_round_trip(value: object) -> None:
    back = _values.decode(_values.encode(value, "k"), "k")
    assert back == value
    assert type(back) is type(value)


def test_a_value_without_a_typed_form_is_refused_naming_its_key() -> None:
    with pytest.raises(ckpt.StateError, match="'k/0'"):
        _values.encode([object()], "k")
    with pytest.raises(ckpt.StateError, match=r"not a ckpt\.dcp value envelope"):
        _values.from_plain({"$dcp": "os.system", "value": "x"}, "k")
