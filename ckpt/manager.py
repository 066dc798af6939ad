"""CheckpointManager: the training-loop hook. Save every N steps (async by default), keep what
the retention policy keeps, resume from the newest committed checkpoint.

Async save: the training thread blocks only while the state's tensors are copied into host
staging buffers (allocated once, reused by every save); a background thread then writes the
shard files and commits. One save is in flight at a time: the next ``save`` waits for it (or is
skipped, ``when_busy="skip"``). A background failure is raised by the next call of ``save``,
``wait``, ``restore`` or ``close``: never silently dropped.

Several ranks (torchrun, Ray Train workers: any initialized torch.distributed world of more than
one process) share one checkpoint per step: every rank constructs its manager at the same point
and calls ``save``/``restore`` with the same steps. The manager then creates two gloo groups of
its own: the background thread coordinates each save on one (``ckpt.parallel.torchrun.save``: rank 0
starts and commits, every rank writes its own shards), the training thread uses the other for
two small agreements: one all-reduce per ``save`` call (has any rank been asked to stop? is any
rank's previous save still in flight?) and the step to restore, and, for a restore from the root,
the shared reads (``ManagerOptions.shared_restore``: each byte fetched once for the job and sent
to the ranks that need it). The training process group is never used, from any thread. Retention
runs on rank 0 only, after a commit.

    mgr = ckpt.CheckpointManager("s3://bucket/run", ckpt.ManagerOptions(save_every=100))
    start = (mgr.restore(state) or -1) + 1
    for step in range(start, steps):
        train_step(state); mgr.save(step, state)
    mgr.close()
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Literal

from ckpt.errors import (
    CheckpointNotFoundError,
    CkptError,
    CkptWarning,
    NoIntactCheckpointError,
    PlanError,
    WorkerFailedError,
)
from ckpt.format.layout import manifest_path
from ckpt.lifecycle import cleanup, retention
from ckpt.lifecycle import restore as restorer
from ckpt.lifecycle import save as saver
from ckpt.lifecycle import steps as steps_mod
from ckpt.lifecycle.retention import RetentionPolicy
from ckpt.options import RestoreOptions, SaveOptions
from ckpt.progress import Progress
from ckpt.state.staging import Staging
from ckpt.storage import Root, Storage, open_storage, root_url
from ckpt.units import human_size

_log = logging.getLogger("ckpt.manager")


@dataclass(frozen=True, slots=True)
class ManagerOptions:
    save_every: int = 1  # save() saves steps divisible by this (force=True saves any step)
    async_save: bool = True  # write and commit in the background after staging
    when_busy: Literal["wait", "skip"] = "wait"  # a save while one is in flight
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    save_options: SaveOptions = field(default_factory=SaveOptions)
    restore_options: RestoreOptions = field(default_factory=RestoreOptions)
    # Preemption (SIGTERM once install_signal_handlers() ran, or request_stop()): the next save()
    # saves that step synchronously, waiting at most this long, then raises
    # SystemExit(PREEMPTED_EXIT_CODE) if exit_on_stop, else returns (see stop_requested).
    stop_deadline_s: float = 120.0
    exit_on_stop: bool = True
    # Several ranks: None = when torch.distributed is initialized with more than one process.
    distributed: bool | None = None
    plain_tensors: Literal["auto", "exclusive", "replicated"] = "auto"  # see ckpt.parallel.torchrun.save
    timeout_s: float = 1800.0  # bound on every wait for a peer rank (several ranks only)
    # restore() without a step: skip damaged newest steps (with a warning) instead of raising
    restore_fallback: bool = True
    # Several ranks: restore() from the root fetches each byte the ranks need once for the job and
    # hands it to the others over the manager's gloo group (ckpt.parallel.torchrun.restore_shared);
    # False: every rank reads all it needs itself. The fast tier is always read per rank.
    shared_restore: bool = True
    # The fast tier (docs/training-loop.md, "Fast tier"): saves commit to this root (a directory
    # in node memory, /dev/shm, or on local NVMe, that every rank of the job sees) and every
    # ``drain_every``-th saved step is then copied, in the background, to the manager's root (the
    # durable tier) with ckpt.copy's verified, resumable, create-only copy. ``fast_retention``
    # applies to the fast tier (never to a step still to be drained), ``retention`` to the root.
    fast_tier: str | None = None
    fast_retention: RetentionPolicy = field(default_factory=lambda: RetentionPolicy(keep_last=2))
    drain_every: int = 1

    def __post_init__(self) -> None:
        if self.save_every < 1:
            raise ValueError("ManagerOptions.save_every must be >= 1")
        if self.drain_every < 1:
            raise ValueError("ManagerOptions.drain_every must be >= 1")
        if self.stop_deadline_s <= 0:
            raise ValueError("ManagerOptions.stop_deadline_s must be positive")
        if self.when_busy not in ("wait", "skip"):
            raise ValueError("ManagerOptions.when_busy must be 'wait' or 'skip'")
        if self.timeout_s <= 0:
            raise ValueError("ManagerOptions.timeout_s must be positive")


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request after a committed save; run again to resume


@dataclass(frozen=True, slots=True)
class SaveStats:
    step: int
    stall_s: float  # the training thread was blocked this long (staging, or the whole sync save)
    staged_bytes: int
    write_s: float | None = None  # write + commit + retention (known once done)
    retired: tuple[int, ...] = ()
    # this save's storage retries by "operation: reason" (one-process saves; {} for rank saves)
    retries: Mapping[str, int] = field(default_factory=dict)


def _logged(root: str, stats: SaveStats) -> SaveStats:
    """``stats``, logged at INFO (one line a save: what training waited, what ran beside it)."""
    _log.info("%s: step %d saved: training stalled %.3f s (%s staged), written and committed in %.2f s%s%s",
              root, stats.step, stats.stall_s, human_size(stats.staged_bytes), stats.write_s or 0.0,
              f", retired steps {list(stats.retired)}" if stats.retired else "",
              "; retries: " + ", ".join(f"{k} x{n}" for k, n in sorted(stats.retries.items())) if stats.retries else "")  # fmt: skip
    return stats


class CheckpointManager:
    """Periodic, retained, resumable checkpoints of one process's state under ``root``."""

    def __init__(
        self,
        root: Root,
        options: ManagerOptions | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        fast_storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.root = root_url(root)
        self.options = options or ManagerOptions()
        self._storage_options = storage_options
        # where saves commit: the fast tier if there is one (then drained to root), else root
        self._fast = None if self.options.fast_tier is None else root_url(self.options.fast_tier, "fast_tier")
        self._fast_options = fast_storage_options
        self._drain_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-drain") if self._fast else None
        self._drains: list[Future[int]] = []
        self._draining: set[int] = set()  # steps queued or being drained: the fast tier keeps them
        self.durable_step: int | None = None  # the newest step this manager drained to root
        self._abandon_drains = False
        self._staging = Staging()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-save")
        self._inflight: Future[SaveStats] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.last_save: SaveStats | None = None  # the last save that finished
        self._save_next = False  # request_save(): the next save() saves whatever its step
        self.skipped = 0  # saves skipped because one was in flight (when_busy="skip")
        self._stop = threading.Event()
        self._previous_handlers: dict[int, Any] = {}
        self._ranks = _Ranks.join(self.options) if self.options.distributed is not False else None
        self._damaged: set[int] = set()  # committed steps restore() skipped as damaged: never saved over

    @property
    def rank(self) -> int:
        return self._ranks.rank if self._ranks else 0

    @property
    def world_size(self) -> int:
        return self._ranks.world if self._ranks else 1

    # --- saving --------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        return step % self.options.save_every == 0

    def save(
        self, step: int, state: object, *, metrics: Mapping[str, float] | None = None, force: bool = False
    ) -> bool:
        """Save ``state`` as ``step`` if the policy says so (or ``force``). Returns whether a save
        was made (sync) or started (async). Raises the error of an earlier background save."""
        self._check_open()
        if type(step) is not int or step < 0:
            raise PlanError(f"step must be a non-negative int, got {step!r}")
        wanted = force or self._save_next or self.should_save(step)
        inflight = self._inflight
        busy = wanted and inflight is not None and not inflight.done()
        stop = self._stop.is_set()
        if self._ranks is not None:  # every rank takes the same branch below
            stop, busy = self._ranks.agree(stop, busy, step)
            if stop:
                self._stop.set()
        if step in self._damaged and (wanted or stop):  # every rank skipped the same steps
            warnings.warn(
                f"{self.root}: step {step} is committed but damaged (restore skipped it), so it is not "
                f"saved again; `ckpt rm {self.root} {step}` lets a later run save it", CkptWarning, stacklevel=2,
            )  # fmt: skip
            wanted = False
        if stop:
            return self._save_and_stop(step, state, metrics)
        if not wanted:
            self._raise_finished()
            return False
        if busy and self.options.when_busy == "skip":
            self.skipped += 1
            return False
        self.wait()  # the previous save is done (its staging buffers are free); raises its error
        self._save_next = False
        user_metadata = {retention.METRIC_PREFIX + k: repr(float(v)) for k, v in (metrics or {}).items()}
        t0 = time.perf_counter()
        if not self.options.async_save:
            self.last_save = _logged(self.root, self._write(step, state, user_metadata, t0, staged_bytes=0))
            return True
        snapshot = self._staging.snapshot(state)
        stall = time.perf_counter() - t0
        staged = self._staging.last.bytes_copied if self._staging.last else 0
        self._inflight = self._pool.submit(self._write_async, step, snapshot, user_metadata, stall, staged)
        return True

    def _async_save_options(self, staged: int) -> SaveOptions:
        """The save options of an async save: upload bodies in flight (object stores) at most
        1/8 of the staged bytes (at least two parts), so that staging plus uploads stay within
        ~1.15x the state (measured: BENCHMARKS.md, stall)."""
        opts = self.options.save_options
        cap = max(2 * opts.write_chunk_bytes, staged // 8)
        return dataclasses.replace(opts, max_inflight_bytes=min(opts.max_inflight_bytes, cap))

    def _drain(self, step: int) -> None:
        """Queue the copy of fast-tier ``step`` to the durable root (rank 0, after its commit)."""
        assert self._drain_pool is not None
        with self._lock:
            self._draining.add(step)
        self._drains.append(self._drain_pool.submit(self._drain_one, step))

    def _drain_one(self, step: int) -> int:
        from ckpt.lifecycle import copy as copier

        assert self._fast is not None
        try:
            t0 = time.perf_counter()
            copier.copy(self._fast, self.root, [step], src_storage_options=self._fast_options,
                        dst_storage_options=self._storage_options)  # fmt: skip
            retired = self._retire(self.root, self._storage_options, self.options.retention)
            self.durable_step = step if self.durable_step is None else max(self.durable_step, step)
            _log.info("%s: step %d drained from %s in %.2f s%s", self.root, step, self._fast, time.perf_counter() - t0,
                      f", retired steps {retired}" if retired else "")  # fmt: skip
            return step
        finally:
            with self._lock:
                self._draining.discard(step)

    def wait_durable(self) -> int | None:
        """Block until every drain queued so far is done (the save in flight first); raise the
        first drain error. Returns :attr:`durable_step`. Without a fast tier: :meth:`wait`."""
        self.wait()
        drains, self._drains = self._drains, []
        errors = []
        for d in drains:
            try:
                d.result()
            except BaseException as err:
                errors.append(err)
        if errors:
            errors[0].add_note(f"(raised by the background drain from {self._fast} to {self.root})")
            raise errors[0]
        return self.durable_step if self._fast else self.committed_step

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise its error if it failed."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        try:
            self.last_save = inflight.result()
        except BaseException as err:
            err.add_note(f"(raised by the background save under {self.root})")
            raise

    def _raise_finished(self) -> None:
        if self._inflight is not None and self._inflight.done():
            self.wait()
        failed = [d for d in self._drains if d.done() and d.exception() is not None]
        if failed:
            self._drains = [d for d in self._drains if d not in failed]
            err = failed[0].exception()
            assert err is not None
            err.add_note(f"(raised by the background drain from {self._fast} to {self.root})")
            raise err

    def _write_async(self, step: int, snapshot: object, meta: dict[str, str], stall: float, staged: int) -> SaveStats:
        t0 = time.perf_counter()
        done = self._write(step, snapshot, meta, t0, staged_bytes=staged, save_options=self._async_save_options(staged))
        return _logged(self.root, SaveStats(step, stall, staged, done.write_s, done.retired, done.retries))

    def _write(self, step: int, state: object, meta: dict[str, str], t0: float, *, staged_bytes: int,
               save_options: SaveOptions | None = None) -> SaveStats:  # fmt: skip
        opts = save_options or self.options.save_options
        final: list[Progress] = []
        root, storage_options = (self._fast, self._fast_options) if self._fast else (self.root, self._storage_options)
        if self._ranks is None:
            saver.save(
                root, state, step=step, options=opts, user_metadata=meta, storage_options=storage_options,
                progress=lambda p: final.append(p) if p.phase == "done" else None,
            )  # fmt: skip
        else:
            self._ranks.save(root, state, step, self.options, opts, meta, storage_options)
        if self._fast and self.rank == 0 and step % self.options.drain_every == 0:
            self._drain(step)
        retired = self.apply_retention()
        elapsed = time.perf_counter() - t0
        retries = dict(final[-1].retries) if final else {}
        return SaveStats(step, elapsed, staged_bytes, elapsed, tuple(retired), retries)

    # --- preemption ---------------------------------------------------------------------------

    def request_save(self) -> None:
        """Make the next ``save()`` call save whatever its step (as ``force=True``): a
        just-in-time checkpoint, e.g. when the cluster announces a preemption. Every rank of a
        multi-rank manager must request it at the same step (as it must pass ``force``)."""
        self._save_next = True

    @property
    def committed_step(self) -> int | None:
        """The step of the newest save of this manager known to be committed, without waiting
        for one in flight (its error, if it failed, is raised here)."""
        self._raise_finished()
        return None if self.last_save is None else self.last_save.step

    def request_stop(self) -> None:
        """Ask for a final save at the next ``save()`` call (a step boundary), then a clean exit.
        Safe to call from a signal handler or another thread."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        """Make ``signals`` (default SIGTERM) call :meth:`request_stop` (main thread only).
        ``close()`` puts the previous handlers back. Correctness never depends on the handler:
        a SIGKILL at any moment leaves the newest committed checkpoint intact."""
        for sig in signals:
            self._previous_handlers.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, lambda _sig, _frame: self._stop.set())

    def _save_and_stop(self, step: int, state: object, metrics: Mapping[str, float] | None) -> bool:
        deadline = time.monotonic() + self.options.stop_deadline_s
        inflight, self._inflight = self._inflight, None
        if inflight is not None:  # let the save in flight finish first (its step is older)
            try:
                self._finish_by(inflight, deadline, f"the save in flight did not finish within {{}} s; step {step} was not saved")
            except PlanError:
                raise
            except Exception as err:  # reported, but the final save is what matters now
                warnings.warn(f"{self.root}: the background save failed: {type(err).__name__}: {err}", CkptWarning, stacklevel=3)
        meta = {retention.METRIC_PREFIX + k: repr(float(v)) for k, v in (metrics or {}).items()}
        saved = (self.last_save is not None and self.last_save.step == step) or step in self._damaged
        if not saved:
            job = self._pool.submit(self._write, step, state, meta, time.perf_counter(), staged_bytes=0)
            self._finish_by(job, deadline, f"the save of step {step} did not commit within {{}} s (the newest committed checkpoint stands)")
        if self._fast and self.rank == 0 and step not in self._damaged:
            self._drain_final(step, deadline)
        if self.options.exit_on_stop:
            self.close()
            raise SystemExit(PREEMPTED_EXIT_CODE)
        return True

    def _drain_final(self, step: int, deadline: float) -> None:
        """The stop's step goes to the durable root too (the node may be gone next): drained
        whatever ``drain_every`` says, and the drains waited for until ``deadline``. A drain not
        done by then is left running (the process exits once it ends) with a warning."""
        with self._lock:
            queued = step in self._draining
        if self.durable_step != step and not queued:
            self._drain(step)
        for d in list(self._drains):
            try:
                d.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                warnings.warn(f"{self.root}: the drain of step {step} from {self._fast} did not finish within "
                              f"{self.options.stop_deadline_s:.0f} s; it goes on until the process ends",
                              CkptWarning, stacklevel=3)  # fmt: skip
                self._abandon_drains = True
                return
            except Exception as err:  # the step is committed in the fast tier: reported, not raised
                warnings.warn(f"{self.root}: a drain from {self._fast} failed: {type(err).__name__}: {err}",
                              CkptWarning, stacklevel=3)  # fmt: skip
            self._drains.remove(d)

    def _finish_by(self, job: Future[SaveStats], deadline: float, late: str) -> None:
        """Wait for ``job`` until ``deadline`` (its result becomes ``last_save``); PlanError naming
        ``late`` (formatted with the stop deadline) if it is not done by then."""
        try:
            self.last_save = job.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise PlanError(
                f"{self.root}: stop requested, but " + late.format(f"{self.options.stop_deadline_s:.0f}")
            ) from None

    # --- retention -----------------------------------------------------------------------------

    def apply_retention(self, *, dry_run: bool = False) -> list[int]:
        """Retire the committed checkpoints the retention policy does not keep; return them.
        With several ranks only rank 0 retires (the others return []). With a fast tier, this
        applies ``fast_retention`` to it (a step still to be drained is kept); the drain applies
        ``retention`` to the root after each copy."""
        if self.rank != 0:
            return []
        if self._fast:
            with self._lock:
                keep = set(self._draining)
            return self._retire(self._fast, self._fast_options, self.options.fast_retention, keep=keep, dry_run=dry_run)
        return self._retire(self.root, self._storage_options, self.options.retention, dry_run=dry_run)

    def _retire(self, root: str, storage_options: dict[str, Any] | None, policy: RetentionPolicy, *,
                keep: set[int] | frozenset[int] = frozenset(), dry_run: bool = False) -> list[int]:  # fmt: skip
        storage = open_storage(root, storage_options)
        steps = steps_mod.list_steps(root, storage_options=storage_options)
        metrics: dict[int, float | None] = {}
        if policy.keep_best and policy.metric:
            for s in steps:
                try:
                    m = steps_mod.read_head(storage, s)
                except CheckpointNotFoundError:
                    continue
                metrics[s] = retention.metric_value(dict(m.user_metadata), policy.metric)
        retired = []
        for s in (s for s in retention.to_retire(steps, metrics, policy) if s not in keep):
            # one step at a time: a step that cannot be retired (its data behind a link, a storage
            # failure) is reported and kept, and does not keep the others, nor fail the save
            try:
                cleanup.retire_steps(storage, [s], dry_run=dry_run)
            except CkptError as err:
                warnings.warn(f"{root}: retention kept step {s}, which it could not retire: {err}",
                              CkptWarning, stacklevel=2)  # fmt: skip
                continue
            retired.append(s)
        return retired

    # --- restoring -----------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest committed step, in either tier."""
        durable = steps_mod.latest_step(self.root, storage_options=self._storage_options)
        fast = steps_mod.latest_step(self._fast, storage_options=self._fast_options) if self._fast else None
        return max((s for s in (fast, durable) if s is not None), default=None)

    def restore(self, target: object, *, step: int | None = None) -> int | None:
        """Fill ``target`` from checkpoint ``step`` (default: the newest committed one) and return
        that step, or None if there is no checkpoint yet. Tensors are filled in place; the other
        values of dicts and lists in ``target`` are replaced by the saved ones
        (``ckpt.lifecycle.restore.assign``, the rule ``ckpt.restore(target=)`` follows too).

        Without ``step``, a damaged newest step (damaged data or links found by the restore's
        checks) is skipped with a CkptWarning naming it and why, and the next older one is tried
        (``ManagerOptions.restore_fallback``, on by default: a preempted job resumes instead of
        crash-looping); NoIntactCheckpointError if none is intact. An explicit ``step`` never
        falls back. Several ranks all restore the same step: rank 0 proposes it, and a step
        damaged on any rank is skipped by all."""
        self._check_open()
        self.wait()
        opts = self.options.restore_options
        storage = open_storage(self.root, self._storage_options, io_timeout_s=opts.io_timeout_s)
        if step is not None:
            if self._fast and open_storage(self._fast, self._fast_options).exists(manifest_path(step)):
                restorer.restore(self._fast, step, target=target, options=opts, storage_options=self._fast_options)
            elif self._shares_reads:
                restorer.assign(target, self._restore_shared(storage, step, target, opts))
            else:
                restorer.restore(self.root, step, target=target, options=opts, storage_options=self._storage_options)
            return step
        found = None
        if self._fast:  # the fast tier first, where its newest intact step is at least as new
            fast = open_storage(self._fast, self._fast_options, io_timeout_s=opts.io_timeout_s)
            durable = self._share(lambda: steps_mod.newest_step(storage))

            def newer(below: int | None) -> int | None:
                s = steps_mod.newest_step(fast, below=below)
                return s if s is not None and (durable is None or s >= durable) else None

            try:
                found = self._restore_newest(fast, target, opts, newer)
            except NoIntactCheckpointError as err:
                warnings.warn(f"{self._fast}: no intact step in the fast tier at least as new as the durable "
                              f"tier's; restoring from {self.root}: {err}", CkptWarning, stacklevel=2)  # fmt: skip
        if found is None:
            found = self._restore_newest(storage, target, opts, lambda below: steps_mod.newest_step(storage, below=below),
                                         shared=self._shares_reads)  # fmt: skip
        if found is None:
            return None
        restorer.assign(target, found.state)
        self._damaged.update(found.skipped)
        return found.step

    def _share(self, fn: Callable[[], int | None]) -> int | None:
        """``fn()`` computed on rank 0 and given to every rank (one process: ``fn()``)."""
        ranks = self._ranks
        return fn() if ranks is None else ranks.share(fn() if ranks.rank == 0 else None)

    def _restore_newest(self, storage: Storage, target: object, opts: RestoreOptions,
                        newest: Callable[[int | None], int | None], *, shared: bool = False) -> restorer.Found | None:  # fmt: skip
        return restorer.restore_newest(
            storage, target, opts, fallback=self.options.restore_fallback,
            pick=lambda below: self._share(lambda: newest(below)),
            agree=None if self._ranks is None else self._ranks.worst,
            restore_step=(lambda step: self._restore_shared(storage, step, target, opts)) if shared else None,
        )  # fmt: skip

    @property
    def _shares_reads(self) -> bool:
        return self._ranks is not None and self.options.shared_restore

    def _restore_shared(self, storage: Storage, step: int, target: object, opts: RestoreOptions) -> Any:
        """Step ``step`` restored with every rank's reads shared (each byte fetched once for the job)."""
        assert self._ranks is not None
        return self._ranks.restore_shared(storage, step, target, opts)

    # --- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the save in flight and the drains queued, then stop the background threads.
        Raises the first error."""
        if self._closed:
            return
        try:
            if self._abandon_drains:  # a stop's deadline passed: the drains left go on by themselves
                self.wait()
            else:
                self.wait_durable()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            if self._drain_pool is not None:
                self._drain_pool.shutdown(wait=not self._abandon_drains)
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)
            self._previous_handlers.clear()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:  # already failing: finish the save in flight, don't mask the error with its own
            try:
                self.close()
            except Exception as err:  # the original error propagates; this one is still reported
                warnings.warn(f"{self.root}: the background save failed too: {type(err).__name__}: {err}", CkptWarning, stacklevel=2)

    def _check_open(self) -> None:
        if self._closed:
            raise PlanError(f"the CheckpointManager of {self.root} is closed")

    @property
    def staging_bytes(self) -> int:
        return self._staging.nbytes


class _Ranks:
    """The manager's view of a torch.distributed world: two gloo groups of its own, one per
    thread (the training thread agrees on small flags; the background thread coordinates
    saves)."""

    def __init__(self, rank: int, world: int, timeout_s: float) -> None:
        from ckpt.parallel import torchrun as distributed

        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self._dist = distributed
        self._saves = distributed.new_group(timeout_s)  # background thread only
        self._flags = distributed.new_group(timeout_s)  # training thread only

    @classmethod
    def join(cls, options: ManagerOptions) -> _Ranks | None:
        from ckpt.parallel import torchrun as distributed

        rw = distributed.rank_and_world()
        if rw is None or (options.distributed is None and rw[1] == 1):
            if options.distributed:
                raise PlanError("ManagerOptions(distributed=True) needs an initialized torch.distributed process group")
            return None
        return cls(*rw, options.timeout_s)

    def agree(self, stop: bool, busy: bool, step: int) -> tuple[bool, bool]:
        try:
            s, b = self._dist.agree([int(stop), int(busy)], self._flags)
        except RuntimeError as err:  # a peer died or stopped answering
            raise WorkerFailedError(
                f"rank {self.rank}: the ranks could not agree at step {step} (a rank died or did not "
                f"call save() within {self.timeout_s:.0f} s): {err}"
            ) from err
        return bool(s), bool(b)

    def worst(self, code: int) -> int:
        """The largest of every rank's ``code`` (restore outcomes: 0 ok, 1 damaged, 2 failed)."""
        try:
            return self._dist.agree([code], self._flags)[0]
        except RuntimeError as err:
            raise WorkerFailedError(f"rank {self.rank}: the ranks could not agree on the restore: {err}") from err

    def restore_shared(self, storage: Storage, step: int, target: object, opts: RestoreOptions) -> Any:
        """``step`` restored on every rank, each byte fetched by one rank (the training thread's group)."""
        return self._dist.restore_shared(storage, step, target, opts, group=self._flags, timeout_s=self.timeout_s)

    def share(self, step: int | None) -> int | None:
        try:
            got = self._dist.broadcast_int(-1 if step is None else step, self._flags)
        except RuntimeError as err:
            raise WorkerFailedError(f"rank {self.rank}: could not learn the step to restore from rank 0: {err}") from err
        return None if got < 0 else got

    def save(self, root: str, state: object, step: int, opts: ManagerOptions, save_options: SaveOptions,
             meta: dict[str, str], storage_options: dict[str, Any] | None) -> None:  # fmt: skip
        self._dist.save(
            root, state, step=step, plain_tensors=opts.plain_tensors, options=save_options,
            user_metadata=meta, storage_options=storage_options, timeout_s=self.timeout_s, group=self._saves,
        )  # fmt: skip

