"""``ckpt.dcp.StorageReader``: ``torch.distributed.checkpoint.load`` from a ckpt checkpoint.

``read_metadata`` reads the step's manifest (validated as every ckpt read is) and describes it
to DCP (``ckpt.dcp._mapping.view``): no ``.metadata`` pickle exists or is read. ``read_data``
reads each requested region with ckpt's restore planner and executor (ranged reads, block CRCs
checked) into the tensors the load planner resolves, and hands non-tensor values to the planner
as typed JSON (``ckpt.dcp.LoadPlanner``); opaque bytes are handed back only on request.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.planner import LoadPlanner as DcpLoadPlanner
from torch.distributed.checkpoint.storage import StorageReader as DcpStorageReader
from torch.futures import Future

from ckpt.dcp import _mapping, _values
from ckpt.dcp._planners import LoadPlanner
from ckpt.dcp._root import Rooted
from ckpt.engine.restore_plan import Request
from ckpt.errors import MissingKeyError, OpaqueBytesError, PlanError
from ckpt.format import dtypes, strictjson
from ckpt.format.manifest import Manifest
from ckpt.geometry.boxes import Box
from ckpt.lifecycle import restore as restorer
from ckpt.lifecycle import steps
from ckpt.options import RestoreOptions
from ckpt.storage import Storage, open_storage

_STEP, _ATTEMPT = "ckpt.step", "ckpt.attempt"


@dataclasses.dataclass(frozen=True)
class _Loaded:
    storage: Storage
    manifest: Manifest
    view: _mapping.View


class StorageReader(Rooted, DcpStorageReader):
    """Read checkpoint ``step`` (None: the newest committed one) under ``root`` for ``dcp.load``.

    Args:
        root: a ckpt root; a ``checkpoint_id`` passed to ``dcp.load`` replaces it.
        step: the step to read; None for the newest committed step (every rank reads the one
            the coordinator resolved, or fails).
        storage_options: this process's credentials and fsspec options.
        options: ``ckpt.RestoreOptions`` (verification, threads, read sizes).
        allow_opaque_bytes: hand values stored as opaque bytes (saved with
            ``StorageWriter(allow_opaque_bytes=True)``) to the load planner, whose own code
            decides what to do with them (DCP's default planner unpickles them). Without it
            they are refused with OpaqueBytesError. ckpt itself never decodes them.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        step: int | None = None,
        storage_options: dict[str, Any] | None = None,
        options: RestoreOptions | None = None,
        *,
        allow_opaque_bytes: bool = False,
    ) -> None:
        super().__init__(root, storage_options, allow_opaque_bytes)
        self.step = step
        self.options = options or RestoreOptions()
        self._loaded: _Loaded | None = None

    def _forget(self) -> None:
        self._loaded = None

    def read_metadata(self) -> Metadata:
        storage = open_storage(self.root, self.storage_options, io_timeout_s=self.options.io_timeout_s)
        m = steps.resolve_step(storage, self.step)
        self._loaded = _Loaded(storage, m, _mapping.view(m))
        return self._loaded.view.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        m = self._state().manifest
        return [dataclasses.replace(p, storage_data={_STEP: m.step, _ATTEMPT: m.attempt}) for p in plans]

    def _state(self) -> _Loaded:
        if self._loaded is None:
            raise PlanError("ckpt.dcp.StorageReader: read_metadata was not called")
        return self._loaded

    def read_data(self, plan: LoadPlan, planner: DcpLoadPlanner) -> Future[None]:
        st = self._state()
        m, v = st.manifest, st.view
        sd = plan.storage_data
        if isinstance(sd, dict) and (sd.get(_STEP), sd.get(_ATTEMPT)) != (m.step, m.attempt):
            raise PlanError(
                f"{self.root}: this rank read step {m.step}, the coordinator step {sd.get(_STEP)} (a save "
                "committed in between?); pass step= to read one step on every rank"
            )
        values = [i for i in plan.items if i.type == LoadItemType.BYTE_IO]
        tensors = [i for i in plan.items if i.type != LoadItemType.BYTE_IO]
        for item in values:  # refusals first, before any tensor is read
            self._check_value(item, v, planner)
        for item in values:
            value = v.values[item.storage_index.fqn]
            data = value.data if isinstance(value, _values.Opaque) else strictjson.dumps(
                _values.encode(value, item.storage_index.fqn))  # fmt: skip
            planner.load_bytes(item, io.BytesIO(data))
        if tensors:
            self._read_tensors(st, tensors, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _check_value(self, item: ReadItem, v: _mapping.View, planner: DcpLoadPlanner) -> None:
        fqn = item.storage_index.fqn
        if fqn not in v.values:
            raise MissingKeyError(f"{fqn!r} is not a non-tensor value of this checkpoint")
        if isinstance(v.values[fqn], _values.Opaque):
            if not self.allow_opaque_bytes:
                raise OpaqueBytesError(
                    f"key {fqn!r} is stored as opaque bytes (a pickle DCP's default planner made); "
                    "pass StorageReader(..., allow_opaque_bytes=True) to hand them to your load planner"
                )
        elif not isinstance(planner, LoadPlanner):
            raise PlanError(
                f"key {fqn!r} is a typed value, which {type(planner).__name__} would try to unpickle; "
                "load with planner=ckpt.dcp.LoadPlanner()"
            )

    def _read_tensors(self, st: _Loaded, items: list[ReadItem], planner: DcpLoadPlanner) -> None:
        m, v = st.manifest, st.view
        requests: list[Request] = []
        resolved: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        direct: list[torch.Tensor | None] = []
        for item in items:
            fqn = item.storage_index.fqn
            key = v.tensors.get(fqn)
            if key is None:
                raise MissingKeyError(f"{fqn!r} is not a tensor of this checkpoint")
            base = item.storage_index.offset or torch.Size([0] * len(item.lengths))
            box = Box(tuple(b + o for b, o in zip(base, item.storage_offsets, strict=True)), tuple(item.lengths))
            tensor = planner.resolve_tensor(item)
            target = tensor.detach()  # the same memory, writable whatever its requires_grad
            saved = dtypes.BY_CODE[m.tensors[key].dtype].torch_dtype
            if tuple(target.shape) != box.sizes:
                raise PlanError(f"key {fqn!r}: the planner's tensor is {list(target.shape)}, the read is {list(box.sizes)}")
            ok = target.device.type == "cpu" and target.is_contiguous() and target.dtype == saved
            requests.append(Request(key, box))
            resolved.append(tensor)
            targets.append(target)
            direct.append(target if ok else None)
        got = restorer.read_regions(st.storage, m, requests, direct, self.options)
        for item, tensor, target, buf in zip(items, resolved, targets, got, strict=True):
            if buf is not target:
                target.copy_(buf)  # to the target's device and dtype, as DCP's own readers do
            planner.commit_tensor(item, tensor)
