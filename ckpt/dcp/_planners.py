"""DCP planners that store non-tensor values as typed JSON instead of ``torch.save`` bytes.

DCP's default planners turn every non-tensor leaf (an epoch counter, a learning rate, a
``torch.dtype``) into a pickle on save and ``torch.load`` it on load, so loading a checkpoint
runs code from storage. These subclasses keep everything else of the defaults (flattening,
deduplication, resharding) and change only that: :class:`SavePlanner` encodes each value with
ckpt's typed JSON (``ckpt.dcp._values``), :class:`LoadPlanner` decodes it, and neither ever
pickles or unpickles. They work with any DCP storage; with ``ckpt.dcp.StorageWriter`` the values
land in the manifest's ``objects``.
"""

from __future__ import annotations

import io
from typing import Any

from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, WriteItem, WriteItemType

from ckpt.dcp import _values
from ckpt.errors import OpaqueBytesError
from ckpt.format import strictjson
from ckpt.state import tree

MAX_VALUE_BYTES = 1 << 30  # the manifest's own cap: no typed value can be larger


class SavePlanner(DefaultSavePlanner):
    """``DefaultSavePlanner`` whose non-tensor values are typed JSON, never pickles. Every value
    is encoded when the local plan is made, so a value without a typed form is refused (a
    StateError naming its key) before anything is written. Nested empty dicts, which DCP's
    flattening drops, are kept (saved as the value ``{}``)."""

    def set_up_planner(self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict=_values.keep_empty(state_dict), storage_meta=storage_meta,
                               is_coordinator=is_coordinator)  # fmt: skip

    def create_local_plan(self) -> SavePlan:
        plan: SavePlan = super().create_local_plan()
        self._encoded: dict[str, tree.Json] = {}
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                self._encoded[item.index.fqn] = _values.encode(self.lookup_object(item.index), item.index.fqn)
        return plan

    def resolve_value(self, write_item: WriteItem) -> tree.Json:
        """The typed JSON value of a non-tensor item (what ``ckpt.dcp.StorageWriter`` stores)."""
        fqn = write_item.index.fqn
        encoded = getattr(self, "_encoded", {})
        if fqn in encoded:
            return encoded[fqn]
        return _values.encode(self.lookup_object(write_item.index), fqn)

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:  # for other storages: the JSON text as bytes
            return io.BytesIO(strictjson.dumps(self.resolve_value(write_item)))
        return object


class LoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor values as the typed JSON :class:`SavePlanner`
    writes. Anything else (a pickle) is refused with OpaqueBytesError: never unpickled."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        data = value.getvalue()
        try:
            j = strictjson.loads(data, what=f"value {fqn!r}", error=ValueError, max_bytes=MAX_VALUE_BYTES)
        except ValueError:
            decoded: object = _values.Opaque(data)
        else:
            decoded = _values.decode(j, fqn)
        if isinstance(decoded, _values.Opaque):
            raise OpaqueBytesError(
                f"key {fqn!r}: stored as opaque bytes (a pickle?), not as a typed value; "
                "ckpt.dcp.LoadPlanner never unpickles. Load it with a planner of your own if you "
                "trust the checkpoint, or save it with ckpt.dcp.SavePlanner"
            )
        self.set_value(read_item, decoded)

    def set_value(self, read_item: ReadItem, value: object) -> None:
        """Put a decoded value where the target state dict has it (as the default planner does)."""
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], value)
        else:
            self.state_dict[fqn] = value


