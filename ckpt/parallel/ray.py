"""Ray glue: the only module that imports ray.

Driver pattern (a group of Ray actors holds the training state)::

    m = ckpt.parallel.ray.save(root, actors, step=100)            # every actor writes, the driver commits
    ckpt.parallel.ray.restore(root, actors)                        # every actor reads what it needs
    ckpt.parallel.ray.restore_shared(root, actors)                 # each byte fetched once per node

Each actor gives its state through a method (default ``checkpoint_state()``, called once per
save: the describe exchange and the write use what it gave) and, on restore,
its target (``checkpoint_target()``) and a loader (``load_checkpoint(state)``); both can be
functions ``fn(actor_self)`` instead. Work runs inside the actors (``__ray_call__``); only small
JSON reports travel back. If an actor raises or dies, every waiting party gets a
WorkerFailedError naming the rank within ``timeout_s``, and nothing is committed.

SPMD pattern on Ray (Ray Train workers): :class:`Coordinator`, a named actor per root, hands out
one attempt per step and commits when every rank has reported, so no training process group is
used for checkpoint coordination.

Credentials never travel to the actors: each worker builds its own file system from its
environment (instance role, IRSA, ``AWS_*`` variables) plus the non-secret ``storage_options``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

import ray

from ckpt.engine import share_plan
from ckpt.errors import PlanError, WorkerFailedError
from ckpt.format.manifest import Manifest
from ckpt.lifecycle import restore as restorer
from ckpt.lifecycle import save as saver
from ckpt.lifecycle import steps
from ckpt.lifecycle.attempt import Attempt
from ckpt.options import RestoreOptions, SaveOptions
from ckpt.parallel import _protocol
from ckpt.parallel._segments import FetchedSegments
from ckpt.state import tree
from ckpt.storage import Root, root_url

StateFn = str | Callable[[Any], Any]
_SECRET_KEYS = frozenset(
    {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
     "sse_customer_key", "SSECustomerKey", "session_token", "client_secret", "account_key", "sas_token",
     "connection_string", "credential"}
)  # fmt: skip


def check_no_credentials(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Refuse storage_options that would carry secrets to Ray workers (Ray serializes arguments)."""
    opts = dict(storage_options or {})
    found = sorted(_find_secret_keys(opts))
    if found:
        raise PlanError(
            f"storage_options {found} look like credentials; ckpt does not send credentials to Ray "
            "workers. Give each worker its credentials through its environment (instance role, "
            "IRSA/workload identity, AWS_* or AZURE_STORAGE_* environment variables) and pass only non-secret "
            "settings such as endpoint_url"
        )
    return opts


def _find_secret_keys(opts: object, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(opts, dict):
        for k, v in opts.items():
            if isinstance(k, str) and k in _SECRET_KEYS:
                out.append(prefix + k)
            out.extend(_find_secret_keys(v, f"{prefix}{k}."))
    return out


def _call(fn: StateFn, obj: Any, *args: Any) -> Any:
    return getattr(obj, fn)(*args) if isinstance(fn, str) else fn(obj, *args)


# In each actor's process: the state an actor gave at the describe step of a save, flattened,
# for that save's write step (one call of its state method per save). Keyed by the actor;
# at most one per actor, dropped by the next write step of any save.
_TAKEN: dict[int, tuple[str, tree.Flat]] = {}
_TAKEN_LOCK = threading.Lock()


def _step_in_actor(
    self: Any, step: _protocol.WriterStep, state_fn: StateFn, rank: int, payload: _protocol.Msg,
    storage_options: dict[str, Any], save_id: str,
) -> _protocol.Msg:  # fmt: skip
    def state() -> object:
        with _TAKEN_LOCK:
            taken = _TAKEN.pop(id(self), None) if step == "write" else None
        if taken is not None and taken[0] == save_id:
            return taken[1]  # the state this save described
        flat = tree.flatten(_call(state_fn, self))
        if step == "describe":
            with _TAKEN_LOCK:
                _TAKEN[id(self)] = (save_id, flat)
        return flat

    return _protocol.writer_reply(step, state, rank, payload, storage_options)


def _restore_in_actor(
    self: Any, root: str, step: int, target_fn: StateFn | None, load_fn: StateFn | None,
    options: RestoreOptions, storage_options: dict[str, Any],
) -> None:  # fmt: skip
    target = _call(target_fn, self) if target_fn is not None else None
    state = restorer.restore(root, step, target=target, options=options, storage_options=storage_options)
    if load_fn is not None:
        _call(load_fn, self, state)


def _wait(refs: Sequence[Any], timeout_s: float) -> tuple[dict[int, Any], dict[int, str]]:
    """ray.get every ref with one deadline: the results and the failed (or late) ranks by rank.
    The first failure ends the wait: the refs still pending are cancelled and left out."""
    deadline = time.monotonic() + timeout_s
    pending = {ref: rank for rank, ref in enumerate(refs)}
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
        for ref in ready:
            rank = pending.pop(ref)
            try:
                results[rank] = ray.get(ref)
            except Exception as err:  # RayActorError, RayTaskError(...) wrap the worker's error
                failures[rank] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:500]}"
        if failures:
            break  # one failure fails the save: stop waiting for the rest
    for ref, rank in pending.items():
        if not failures:
            failures[rank] = f"no answer within {timeout_s:.0f} s"
        ray.cancel(ref)
    return results, failures


def _gather(refs: Sequence[Any], *, what: str, timeout_s: float) -> list[Any]:
    """Every ref's result, or WorkerFailedError naming every failed or late rank."""
    results, failures = _wait(refs, timeout_s)
    if failures:
        ranks = ", ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
        raise WorkerFailedError(f"{what} failed on {len(failures)} of {len(refs)} workers ({ranks})", failures)
    return [results[r] for r in range(len(refs))]


class _Actors:
    """The protocol's transport for the driver pattern: the driver coordinates and holds no state
    (a broadcast stays with it); every actor runs the writer steps through ``__ray_call__``,
    asked for its state once per save (the write step reuses what the describe step took)."""

    rank: int | None = None
    coordinator = True

    def __init__(self, actors: Sequence[Any], state_fn: StateFn, storage_options: dict[str, Any], timeout_s: float):
        self.actors, self.world_size = actors, len(actors)
        self.state_fn, self.storage_options, self.timeout_s = state_fn, storage_options, timeout_s
        self.save_id = uuid.uuid4().hex  # one transport per save

    def broadcast(self, msg: _protocol.Msg | None) -> _protocol.Msg:
        assert msg is not None
        return msg

    def gather(self, step: _protocol.WriterStep, payload: _protocol.Msg) -> dict[int, _protocol.Msg]:
        refs = [a.__ray_call__.remote(_step_in_actor, step, self.state_fn, rank, payload, self.storage_options, self.save_id)
                for rank, a in enumerate(self.actors)]  # fmt: skip
        replies, failures = _wait(refs, self.timeout_s)
        return {**replies, **{r: {"error": m} for r, m in failures.items()}}


def save(
    root: Root,
    actors: Sequence[Any],
    *,
    step: int,
    state_fn: StateFn = "checkpoint_state",
    plain_tensors: Literal["auto", "exclusive", "replicated"] = "auto",
    options: SaveOptions | None = None,
    user_metadata: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
    timeout_s: float = 1800.0,
) -> Manifest:
    """Save the state held by ``actors`` (rank = position in the list); the driver commits.

    ``plain_tensors="auto"`` (default) first asks every actor for the names, dtypes and shapes
    of its plain tensors: a key several actors hold is a replica, written once.
    """
    root = root_url(root)
    opts = check_no_credentials(storage_options)
    m = _protocol.coordinated_save(_Actors(actors, state_fn, opts, timeout_s), root, step=step, plain_tensors=plain_tensors,
                                   options=options, user_metadata=user_metadata, storage_options=opts)  # fmt: skip
    assert m is not None  # the driver is the coordinator
    return m


def restore(
    root: Root,
    actors: Sequence[Any],
    *,
    step: int | None = None,
    target_fn: StateFn | None = "checkpoint_target",
    load_fn: StateFn | None = "load_checkpoint",
    options: RestoreOptions | None = None,
    storage_options: dict[str, Any] | None = None,
    timeout_s: float = 1800.0,
) -> int:
    """Restore ``step`` (default: the latest) into every actor; returns the step."""
    root = root_url(root)
    opts = check_no_credentials(storage_options)
    if step is None:
        step = steps.read_manifest(root, storage_options=opts).step
    refs = [
        actor.__ray_call__.remote(_restore_in_actor, root, step, target_fn, load_fn, options or RestoreOptions(), opts)
        for actor in actors
    ]
    _gather(refs, what=f"restore of step {step}", timeout_s=timeout_s)
    return step


class _Coordinator:
    """Named actor that coordinates SPMD saves on Ray without a process group.

    Every rank calls ``begin(step, world_size)`` (all get the same attempt), writes its shards,
    then ``report(step, rank, report_or_error)``, which returns once the step is committed (or
    raises, naming the failed or missing ranks, within ``timeout_s``).
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self._root = root
        self._opts = check_no_credentials(storage_options)
        self._attempts: dict[int, Attempt] = {}
        self._replies: dict[int, dict[int, _protocol.Msg]] = {}
        self._done: dict[int, asyncio.Event] = {}
        self._outcome: dict[int, _protocol.Msg] = {}

    def begin(self, step: int, world_size: int, options: SaveOptions | None = None) -> Attempt:
        if step not in self._attempts or "step" not in self._outcome.get(step, {"step": step}):  # none, or failed
            self._attempts[step] = saver.begin(
                self._root, step=step, world_size=world_size, options=options, storage_options=self._opts
            )
            self._replies[step] = {}
            self._done[step] = asyncio.Event()
            self._outcome.pop(step, None)
        return self._attempts[step]

    async def report(self, step: int, attempt_id: str, rank: int, reply: _protocol.Msg, timeout_s: float) -> _protocol.Msg:
        """Hand in a writer's reply; returns the outcome (see ``_protocol.settle``) for every rank."""
        attempt = self._attempts.get(step)
        if attempt is None or attempt.attempt != attempt_id:
            raise PlanError(f"rank {rank}: attempt {attempt_id} is not the current attempt for step {step}")
        replies = self._replies[step]
        replies[rank] = reply
        if step not in self._outcome and ("error" in reply or len(replies) == attempt.world_size):
            self._finish(step, _protocol.close(attempt, replies, self._opts)[0])  # the failed ranks, or commit
        try:
            await asyncio.wait_for(self._done[step].wait(), timeout=timeout_s)
        except TimeoutError:
            missing = sorted(set(range(attempt.world_size)) - replies.keys())
            self._finish(step, {"failed": {str(r): f"no report within {timeout_s:.0f} s" for r in missing}})
        return self._outcome[step]

    def _finish(self, step: int, outcome: _protocol.Msg) -> None:
        self._outcome[step] = outcome
        self._done[step].set()


Coordinator: Any = ray.remote(num_cpus=0, max_concurrency=1000)(_Coordinator)  # type: ignore[call-overload]


def coordinator(root: Root, *, storage_options: dict[str, Any] | None = None, namespace: str | None = None) -> Any:
    """The named Coordinator actor for ``root`` (created on first use)."""
    root = root_url(root)
    import hashlib

    opts = check_no_credentials(storage_options)  # refused here, before Ray serializes them
    name = "ckpt-coordinator-" + hashlib.sha256(root.encode()).hexdigest()[:16]
    return Coordinator.options(name=name, get_if_exists=True, namespace=namespace, lifetime="detached").remote(
        root, opts
    )


def spmd_save(
    root: Root,
    state: object,
    *,
    step: int,
    rank: int,
    world_size: int,
    plain_tensors: Literal["exclusive", "replicated"] = "exclusive",
    options: SaveOptions | None = None,
    storage_options: dict[str, Any] | None = None,
    timeout_s: float = 1800.0,
) -> int:
    """Save from inside an SPMD worker on Ray (e.g. a Ray Train worker); every rank calls this.
    Returns the committed step on every rank, or raises WorkerFailedError on every rank."""
    root = root_url(root)
    opts = check_no_credentials(storage_options)
    coord = coordinator(root, storage_options=opts)
    attempt: Attempt = ray.get(coord.begin.remote(step, world_size, options), timeout=timeout_s)
    payload = {"attempt": _protocol.attempt_wire(attempt), "plan": plain_tensors}
    reply = _protocol.writer_reply("write", lambda: state, rank, payload, opts)
    try:
        outcome = ray.get(coord.report.remote(step, attempt.attempt, rank, reply, timeout_s), timeout=timeout_s + 30)
    except ray.exceptions.RayTaskError as err:
        raise WorkerFailedError(str(err).strip().splitlines()[-1]) from None
    return int(_protocol.settle(outcome, step)["step"])


# --- shared restore: each byte fetched once per node ---------------------------------------------


def restore_shared(
    root: Root,
    actors: Sequence[Any],
    *,
    step: int | None = None,
    target_fn: StateFn | None = "checkpoint_target",
    load_fn: StateFn | None = "load_checkpoint",
    options: RestoreOptions | None = None,
    storage_options: dict[str, Any] | None = None,
    timeout_s: float = 1800.0,
    slab_bytes: int = 256 << 20,
) -> int:
    """:func:`restore`, with each byte the actors need fetched from the store **once per node**:
    the driver reads the manifest and sends it to the actors; each actor plans its reads for its
    target; per node, the union of its actors' ranges is cut into segments (``share_plan``), each
    fetched by one actor of that node into the node's Ray object store, from which every actor of
    the node that needs it takes it (no copy across nodes unless Ray moves an object); every actor
    checks the CRC-32C of every block it uses. Slab by slab: at most ``slab_bytes`` of a node's
    segments are in its object store at once. Returns the step."""
    root = root_url(root)
    opts = check_no_credentials(storage_options)
    ropts = options or RestoreOptions()
    m = steps.read_manifest(root, step, storage_options=opts)
    data = m.to_json()
    rid = uuid.uuid4().hex
    what = f"shared restore of step {m.step}"
    try:
        begun = _gather([a.__ray_call__.remote(_shared_begin, rid, root, m.step, data, target_fn, load_fn, ropts, opts)
                         for a in actors], what=what, timeout_s=timeout_s)  # fmt: skip
        nodes: dict[str, list[int]] = {}
        for rank, b in enumerate(begun):
            nodes.setdefault(b["node"], []).append(rank)
        plans = {node: share_plan.plan_shared([begun[r]["ranges"] for r in ranks], max_segment_bytes=64 << 20,
                                              slab_bytes=slab_bytes) for node, ranks in nodes.items()}  # fmt: skip
        rounds = max((len(p.slabs) for p in plans.values()), default=0)
        for k in range(max(rounds, 1)):
            refs: dict[int, dict[int, Any]] = {r: {} for r in range(len(actors))}  # rank -> segment -> ref
            for node, ranks in nodes.items():
                p = plans[node]
                if k >= len(p.slabs):
                    continue
                for i in range(*p.slabs[k]):
                    s = p.segments[i]
                    ref = actors[ranks[s.owner]].__ray_call__.remote(_shared_fetch, rid, s.path, s.start, s.end)
                    for local in s.needers:
                        refs[ranks[local]][i] = (s.path, s.start, s.end, ref)
            last = k == max(rounds, 1) - 1
            _gather([a.__ray_call__.remote(_shared_feed, rid, list(refs[r].values()), last) for r, a in enumerate(actors)],
                    what=what, timeout_s=timeout_s)  # fmt: skip
            del refs  # the node's object store frees the slab
    except BaseException:
        for a in actors:  # unblock the actors' restore threads (best effort)
            a.__ray_call__.remote(_shared_end, rid)
        raise
    return m.step


class _ActorRestore:
    """One shared restore inside an actor: its restore runs on a thread of its own, whose plan
    runner hands its read ranges to :func:`_shared_begin` and then reads the segments each
    :func:`_shared_feed` brings."""

    def __init__(self, storage: Any) -> None:
        import queue

        self.storage = storage
        self.ranges: queue.Queue[Any] = queue.Queue()
        self.slabs: queue.Queue[Any] = queue.Queue()
        self.done: queue.Queue[Any] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.outcome: Any = None

    def runner(self, storage: Any, plan: Any, dests: list[memoryview], options: RestoreOptions) -> None:
        from ckpt.engine import executor
        from ckpt.engine.restore_plan import RestorePlan

        self.ranges.put([(op.path, op.range.start, op.range.end) for op in plan.reads])
        pending = list(range(len(plan.reads)))
        have: list[tuple[str, int, int, Any]] = []
        while True:
            slab = self.slabs.get()
            if slab is None:
                raise WorkerFailedError("the shared restore was ended by the driver")
            segments, last = slab
            have.extend(segments)
            reader = FetchedSegments(storage, have)
            ready = [k for k in pending if reader.covers(plan.reads[k])]
            if ready:
                sub = RestorePlan(tuple(plan.reads[k] for k in ready), plan.files)
                executor.read_plan(reader, sub, dests, num_threads=options.num_threads,
                                   max_inflight_bytes=options.max_inflight_bytes)  # fmt: skip
                pending = [k for k in pending if k not in set(ready)]
                have = [h for h in have if any(reader.overlaps(plan.reads[k], h) for k in pending)]
            if last:
                if pending:
                    raise PlanError(f"{len(pending)} reads were not served by the shared restore (a bug)")
                return
            self.done.put(None)


_SHARED: dict[tuple[int, str], _ActorRestore] = {}


def _shared_begin(
    self: Any, rid: str, root: str, step: int, data: bytes, target_fn: StateFn | None, load_fn: StateFn | None,
    options: RestoreOptions, storage_options: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    from ckpt.format import manifest as manifest_mod
    from ckpt.format.layout import manifest_path
    from ckpt.storage import open_storage

    storage = open_storage(root, storage_options, io_timeout_s=options.io_timeout_s)
    m = manifest_mod.parse(data, where=storage.where(manifest_path(step)), expected_step=step, lazy=True)
    target = _call(target_fn, self) if target_fn is not None else None
    job = _SHARED[(id(self), rid)] = _ActorRestore(storage)

    def run() -> None:
        try:
            state = restorer.restore_manifest(storage, m, target=target, options=options, runner=job.runner)
            restorer.assign(target, state)
            if load_fn is not None:
                _call(load_fn, self, state)
            job.outcome = ("ok", None)
        except BaseException as err:
            job.outcome = ("error", err)
            job.ranges.put(err)
        job.done.put(None)

    job.thread = threading.Thread(target=run, name=f"ckpt-restore-{rid[:8]}", daemon=True)
    job.thread.start()
    got = job.ranges.get()
    if isinstance(got, BaseException):
        _SHARED.pop((id(self), rid), None)
        raise got
    return {"node": ray.get_runtime_context().get_node_id(), "ranges": got}


def _shared_fetch(self: Any, rid: str, path: str, start: int, end: int) -> Any:
    """Bytes ``[start, end)`` of ``path``, returned into this node's object store."""
    import numpy as np

    job = _SHARED[(id(self), rid)]
    buf = np.empty(end - start, dtype=np.uint8)
    job.storage.read_into(path, start, [buf.data])
    return buf


def _shared_feed(self: Any, rid: str, segments: list[tuple[str, int, int, Any]], last: bool) -> None:
    """Hand a slab's segments to the actor's restore and wait until it used them."""
    job = _SHARED[(id(self), rid)]
    got = ray.get([ref for _, _, _, ref in segments]) if segments else []
    job.slabs.put(([(p, a, b, memoryview(arr)) for (p, a, b, _), arr in zip(segments, got, strict=True)], last))
    job.done.get()
    if job.outcome is not None and job.outcome[0] == "error":
        _SHARED.pop((id(self), rid), None)
        raise job.outcome[1]
    if last:
        _SHARED.pop((id(self), rid), None)


def _shared_end(self: Any, rid: str) -> None:
    job = _SHARED.pop((id(self), rid), None)
    if job is not None:
        job.slabs.put(None)
