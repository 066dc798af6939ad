"""``ckpt.dcp.StorageWriter``: ``torch.distributed.checkpoint.save`` writing a ckpt checkpoint.

DCP's save sequence mapped onto ckpt's coordinated save (``ckpt.lifecycle.save``)::

    prepare_global_plan (coordinator)  begin: the step is free, a fresh attempt; the attempt (a
                                       plain record) and each rank's number go to every rank in
                                       its plan's ``storage_data``
    write_data (every rank)            write_shards: this rank's items as safetensors shards
                                       (a tensor chunk is a ckpt Shard of the global tensor at the
                                       chunk's offsets), non-tensor values as typed JSON objects;
                                       the rank's Report (plain JSON data) rides on its WriteResults
    finish (coordinator)               the tree from every FQN's path, then commit: the
                                       reports merged and validated, ONE manifest created
                                       create-only

No ``.metadata`` file is written: the manifest is the only record, and the DCP Metadata is
rebuilt from it on load (``ckpt.dcp.StorageReader``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner import SavePlanner as DcpSavePlanner
from torch.distributed.checkpoint.storage import StorageWriter as DcpStorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ckpt.dcp import _mapping, _values
from ckpt.dcp._planners import SavePlanner
from ckpt.dcp._root import Rooted
from ckpt.errors import OpaqueBytesError, PlanError
from ckpt.lifecycle import attempt as attempt_mod
from ckpt.lifecycle import save as saver
from ckpt.lifecycle.attempt import Attempt, Report
from ckpt.options import SaveOptions
from ckpt.state import tree
from ckpt.state.shard import Shard

_ATTEMPT, _RANK, _REPORT, _KEY = "ckpt.attempt", "ckpt.rank", "ckpt.report", "ckpt.key"


class StorageWriter(Rooted, DcpStorageWriter):
    """Write what ``dcp.save`` / ``dcp.async_save`` is given as checkpoint ``step`` under ``root``.

    Args:
        root: a ckpt root (a directory or an fsspec URL, as for ``ckpt.save``). A
            ``checkpoint_id`` passed to ``dcp.save`` replaces it.
        step: the step to commit; refused (CheckpointExistsError) if already committed.
        storage_options: this process's credentials and fsspec options (never sent to peers).
        options: ``ckpt.SaveOptions``.
        user_metadata: labels for the manifest.
        allow_opaque_bytes: store the bytes DCP's default planner makes of a non-tensor value (a
            pickle) as they are. Without it such a value is refused with OpaqueBytesError naming
            its key: use ``ckpt.dcp.SavePlanner``, which stores it as typed JSON.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        step: int,
        storage_options: dict[str, Any] | None = None,
        options: SaveOptions | None = None,
        *,
        user_metadata: dict[str, str] | None = None,
        allow_opaque_bytes: bool = False,
    ) -> None:
        super().__init__(root, storage_options, allow_opaque_bytes)
        self.step = step
        self.options = options or SaveOptions()
        self.user_metadata = user_metadata
        self._attempt: Attempt | None = None

    def _forget(self) -> None:
        self._attempt = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives") is False:
            raise PlanError("ckpt.dcp.StorageWriter needs use_collectives=True: one coordinator commits the step")
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        a = saver.begin(self.root, step=self.step, world_size=len(plans), options=self.options,
                        user_metadata=self.user_metadata, storage_options=self.storage_options)  # fmt: skip
        self._attempt = a
        wire = attempt_mod.to_wire(a)
        return [dataclasses.replace(p, storage_data={_ATTEMPT: wire, _RANK: r}) for r, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: DcpSavePlanner) -> Future[list[WriteResult]]:
        sd = plan.storage_data
        if not (isinstance(sd, dict) and _ATTEMPT in sd and _RANK in sd):
            raise PlanError("the save plan carries no ckpt attempt: was prepare_global_plan skipped?")
        a = attempt_mod.from_wire(sd[_ATTEMPT])
        rank: int = sd[_RANK]
        if (a.root, a.step) != (self.root, self.step):
            raise PlanError(
                f"the plan is for step {a.step} of {a.root}, this writer saves step {self.step} of {self.root} "
                "(a cached plan? DCP's enable_plan_caching is not supported by ckpt.dcp)"
            )
        typed = isinstance(planner, SavePlanner)
        if not typed and not self.allow_opaque_bytes:
            opaque = [i.index.fqn for i in plan.items if i.type == WriteItemType.BYTE_IO]
            if opaque:
                raise OpaqueBytesError(
                    f"key {opaque[0]!r} is not a tensor: DCP's default planner would store it as a "
                    f"pickle ({len(opaque)} such keys on rank {rank}). Save with "
                    "planner=ckpt.dcp.SavePlanner() to store it as typed JSON, or pass "
                    "allow_opaque_bytes=True to store the pickle as opaque bytes"
                )
        known = _mapping.paths(plan.planner_data)
        tensors: dict[str, torch.Tensor | Shard] = {}
        objects: dict[str, tree.Json] = {}
        keys: list[tuple[WriteItem, str, int]] = []
        for item in plan.items:
            key = _mapping.key_of(_mapping.path_of(item.index.fqn, known))
            if item.type == WriteItemType.BYTE_IO:
                if isinstance(planner, SavePlanner):
                    objects[key] = planner.resolve_value(item)
                else:
                    data = planner.resolve_data(item)
                    if not isinstance(data, io.BytesIO):
                        raise PlanError(f"key {key!r}: the planner resolved a non-tensor item to a {type(data).__name__}")
                    objects[key] = _values.encode(_values.Opaque(data.getvalue()), key)
                keys.append((item, key, 0))
                continue
            td = item.tensor_data
            t = planner.resolve_data(item)
            if td is None or not isinstance(t, torch.Tensor):
                raise PlanError(f"key {key!r}: a tensor item without tensor data")
            if key in tensors:
                raise PlanError(f"key {key!r}: rank {rank} holds several chunks of it; ckpt.dcp writes one per rank")
            tensors[key] = Shard(t.detach(), tuple(td.size), tuple(td.chunk.offsets))
            keys.append((item, key, t.numel() * t.element_size()))
        report = saver.write_shards(a, tree.Flat(tensors, frozenset(), objects, None), rank=rank,
                                    storage_options=self.storage_options)  # fmt: skip
        results = [WriteResult(index=item.index, size_in_bytes=n, storage_data={_RANK: rank, _KEY: key, _REPORT: report})
                   for item, key, n in keys]  # fmt: skip
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        a = self._attempt
        if a is None:
            raise PlanError("finish without prepare_global_plan: this writer did not start the attempt")
        reports = [_report(a, rank, rs) for rank, rs in enumerate(results)]
        known = _mapping.paths(metadata.planner_data)
        leaves = []
        for fqn, md in metadata.state_dict_metadata.items():
            path = _mapping.path_of(fqn, known)
            leaves.append((path, "tensor" if isinstance(md, TensorStorageMetadata) else "object", _mapping.key_of(path)))
        written = {s["key"] for r in reports for s in r["shards"]} | {k for r in reports for k in r["objects"]}
        missing = [key for _, _, key in leaves if key not in written]
        if missing:
            raise PlanError(f"keys {missing[:5]} are in DCP's metadata but no rank wrote them; nothing was committed")
        skeleton = _mapping.build_tree(leaves)
        for r in reports:
            r["tree"] = skeleton
        saver.commit(a, reports, storage_options=self.storage_options)


def _report(a: Attempt, rank: int, results: list[WriteResult]) -> Report:
    """Rank ``rank``'s report from its WriteResults; a rank that wrote nothing has none."""
    if not results:
        return {"step": a.step, "attempt": a.attempt, "rank": rank, "files": {}, "shards": [], "keys": {},
                "objects": {}, "tree": None}  # fmt: skip
    sd = results[0].storage_data
    if not (isinstance(sd, dict) and sd.get(_RANK) == rank and isinstance(sd.get(_REPORT), dict)):
        raise PlanError(f"rank {rank}'s write results carry no ckpt report (another StorageWriter's results?)")
    report: Report = sd[_REPORT]
    return report
