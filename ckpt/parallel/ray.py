"""Ray glue: the only module that imports ray.

Driver pattern (a group of Ray actors holds the training state)::

    m = ckpt.parallel.ray.save(root, actors, step=100)            # every actor writes, the driver commits
    ckpt.parallel.ray.restore(root, actors)                        # every actor reads what it needs

Each actor gives its state through a method (default ``checkpoint_state()``) and, on restore,
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
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import ray

from ckpt.errors import PlanError, WorkerFailedError
from ckpt.format.manifest import Manifest
from ckpt.lifecycle import restore as restorer
from ckpt.lifecycle import save as saver
from ckpt.lifecycle import steps
from ckpt.lifecycle.attempt import Attempt, Report
from ckpt.options import RestoreOptions, SaveOptions

StateFn = str | Callable[[Any], Any]
_SECRET_KEYS = frozenset(
    {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
     "sse_customer_key", "SSECustomerKey", "session_token", "client_secret", "account_key", "sas_token"}
)  # fmt: skip


def check_no_credentials(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Refuse storage_options that would carry secrets to Ray workers (Ray serializes arguments)."""
    opts = dict(storage_options or {})
    found = sorted(_find_secret_keys(opts))
    if found:
        raise PlanError(
            f"storage_options {found} look like credentials; ckpt does not send credentials to Ray "
            "workers. Give each worker its credentials through its environment (instance role, "
            "IRSA/workload identity, AWS_* environment variables) and pass only non-secret "
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


def _describe_in_actor(self: Any, state_fn: StateFn) -> dict[str, list[Any]]:
    return saver.describe(_call(state_fn, self))


def _write_in_actor(
    self: Any, attempt: Attempt, rank: int, state_fn: StateFn, plain: saver.PlainTensors,
    storage_options: dict[str, Any],
) -> Report:  # fmt: skip
    return saver.write_shards(
        attempt, _call(state_fn, self), rank=rank, plain_tensors=plain, storage_options=storage_options
    )


def _restore_in_actor(
    self: Any, root: str, step: int, target_fn: StateFn | None, load_fn: StateFn | None,
    options: RestoreOptions, storage_options: dict[str, Any],
) -> None:  # fmt: skip
    target = _call(target_fn, self) if target_fn is not None else None
    state = restorer.restore(root, step, target=target, options=options, storage_options=storage_options)
    if load_fn is not None:
        _call(load_fn, self, state)


def _gather(refs: Sequence[Any], *, what: str, timeout_s: float) -> list[Any]:
    """ray.get every ref with one deadline; name every failed or late rank."""
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
    if failures:
        ranks = ", ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
        raise WorkerFailedError(f"{what} failed on {len(failures)} of {len(refs)} workers ({ranks})", failures)
    return [results[r] for r in range(len(refs))]


def save(
    root: str,
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
    opts = check_no_credentials(storage_options)
    plain: saver.PlainTensors = "exclusive" if plain_tensors == "auto" else plain_tensors
    if plain_tensors == "auto":
        refs = [actor.__ray_call__.remote(_describe_in_actor, state_fn) for actor in actors]
        plain = saver.holders(_gather(refs, what=f"save of step {step} (describe)", timeout_s=timeout_s))
    attempt = saver.begin(
        root, step=step, world_size=len(actors), options=options, user_metadata=user_metadata, storage_options=opts
    )
    refs = [
        actor.__ray_call__.remote(_write_in_actor, attempt, rank, state_fn, plain, opts)
        for rank, actor in enumerate(actors)
    ]
    reports = _gather(refs, what=f"save of step {step}", timeout_s=timeout_s)
    return saver.commit(attempt, reports, storage_options=opts)


def restore(
    root: str,
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
        self._reports: dict[int, dict[int, Report | str]] = {}
        self._done: dict[int, asyncio.Event] = {}
        self._outcome: dict[int, Manifest | str] = {}

    def begin(self, step: int, world_size: int, options: SaveOptions | None = None) -> Attempt:
        if step not in self._attempts or isinstance(self._outcome.get(step), str):
            self._attempts[step] = saver.begin(
                self._root, step=step, world_size=world_size, options=options, storage_options=self._opts
            )
            self._reports[step] = {}
            self._done[step] = asyncio.Event()
            self._outcome.pop(step, None)
        return self._attempts[step]

    async def report(self, step: int, attempt_id: str, rank: int, report: Report | str, timeout_s: float) -> int:
        attempt = self._attempts.get(step)
        if attempt is None or attempt.attempt != attempt_id:
            raise PlanError(f"rank {rank}: attempt {attempt_id} is not the current attempt for step {step}")
        reports = self._reports[step]
        reports[rank] = report
        if isinstance(report, str) and step not in self._outcome:
            self._finish(step, f"rank {rank} failed: {report}")
        elif len(reports) == attempt.world_size and step not in self._outcome:
            try:
                m = saver.commit(attempt, [r for r in reports.values() if not isinstance(r, str)], storage_options=self._opts)
                self._finish(step, m)
            except Exception as err:
                self._finish(step, f"commit failed: {type(err).__name__}: {err}")
        try:
            await asyncio.wait_for(self._done[step].wait(), timeout=timeout_s)
        except TimeoutError:
            missing = sorted(set(range(attempt.world_size)) - reports.keys())
            self._finish(step, f"no report from ranks {missing} within {timeout_s:.0f} s")
        outcome = self._outcome[step]
        if isinstance(outcome, str):
            raise WorkerFailedError(f"save of step {step} failed: {outcome}")
        return outcome.step

    def _finish(self, step: int, outcome: Manifest | str) -> None:
        self._outcome[step] = outcome
        self._done[step].set()


Coordinator: Any = ray.remote(num_cpus=0, max_concurrency=1000)(_Coordinator)  # type: ignore[call-overload]


def coordinator(root: str, *, storage_options: dict[str, Any] | None = None, namespace: str | None = None) -> Any:
    """The named Coordinator actor for ``root`` (created on first use)."""
    import hashlib

    opts = check_no_credentials(storage_options)  # refused here, before Ray serializes them
    name = "ckpt-coordinator-" + hashlib.sha256(root.encode()).hexdigest()[:16]
    return Coordinator.options(name=name, get_if_exists=True, namespace=namespace, lifetime="detached").remote(
        root, opts
    )


def spmd_save(
    root: str,
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
    opts = check_no_credentials(storage_options)
    coord = coordinator(root, storage_options=opts)
    attempt: Attempt = ray.get(coord.begin.remote(step, world_size, options), timeout=timeout_s)
    try:
        report: Report | str = saver.write_shards(
            attempt, state, rank=rank, plain_tensors=plain_tensors, storage_options=opts
        )
    except Exception as err:
        report = f"{type(err).__name__}: {err}"
    try:
        return int(ray.get(coord.report.remote(step, attempt.attempt, rank, report, timeout_s), timeout=timeout_s + 30))
    except ray.exceptions.RayTaskError as err:
        raise WorkerFailedError(str(err).strip().splitlines()[-1]) from None
