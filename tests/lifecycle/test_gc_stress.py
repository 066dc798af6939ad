"""GC under interleavings (reliability 5.1 items 15 and 16).

Saves (some left running: begin + write_shards without commit, i.e. live attempts; some
abandoned: crashed writers), commits, retention and ``ckpt.lifecycle.cleanup.collect_garbage`` interleave in
random orders (Hypothesis stateful) on local disk and, shorter, on moto S3; and a saver thread
and a GC thread run concurrently on local disk. Invariants after every step:

- GC never deletes a file a committed manifest references, nor a file of an attempt whose
  newest file is younger than the grace period;
- every committed step restores and verifies;
- garbage older than the grace period is gone after a collection.

Model time: ``now = time.time() + offset``; advancing the model clock raises ``offset``. GC
runs with ``now``; every file the test writes gets the model time of its writing as its mtime:
on local disk with ``os.utime``, on S3 (whose LastModified cannot be set) by shifting that
file's listed mtime by the offset at its writing (a wrapper around the Storage, for GC's listing only).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import ckpt
from ckpt.errors import CkptError
from ckpt.lifecycle import cleanup, retention
from ckpt.storage import Listed, LocalStorage, S3Storage, Storage, open_storage
from tests.conftest import s3_options

GRACE = 1000.0  # model seconds
SLACK = 30.0  # real seconds a step may take: ages within SLACK of the grace are not judged
STATS: dict[str, int] = {"steps": 0, "gc_runs": 0, "collected": 0, "commits": 0, "retired": 0, "expired": 0,
                         "examples": 0, "thread_saves": 0, "thread_gcs": 0, "thread_collected": 0}  # fmt: skip


def _tensor_state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 4, generator=g), "meta": {"seed": seed}}


@dataclass
class Live:
    """An attempt begun and (partly) written, not committed."""

    attempt: ckpt.Attempt
    reports: list[ckpt.Report]
    last_write: float  # model time of its newest file
    seed: int
    files: set[str] = field(default_factory=set)
    maybe_collected: bool = False  # a GC ran when it was idle about as long as the grace, or longer


class _Clocked:
    """What GC lists, with each file's mtime moved to the model time of its writing (S3's
    LastModified cannot be set); every other call goes to the wrapped Storage."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.shift: dict[str, float] = {}
        self.is_local = isinstance(inner, LocalStorage)
        self.is_s3 = isinstance(inner, S3Storage)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def list_files(self, prefix: str = "") -> list[Listed]:
        return [
            Listed(f.path, f.size, f.mtime + self.shift.get(f.path, 0.0))
            for f in self.inner.list_files(prefix)
        ]


class GcMachine(RuleBasedStateMachine):
    """One root; the model knows what is committed, live, abandoned and when each was written."""

    root: str
    opts: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        STATS["examples"] += 1
        self.storage = _Clocked(open_storage(self.root, self.opts))
        self.offset = 0.0
        self.next_step = 1
        # live attempts by the order they began: keys must not depend on the attempts' random ids,
        # or Hypothesis's draws (sampled_from over them) differ between replays of one example
        self.live: dict[int, Live] = {}
        self.begun = 0
        self.abandoned: dict[str, float] = {}  # attempt dir -> model time of its newest file
        self.committed: dict[int, int] = {}  # step -> seed of its state
        self.temps: dict[str, float] = {}  # local temp files -> model time written

    # --- the model clock -----------------------------------------------------------------------

    def now(self) -> float:
        return time.time() + self.offset

    @rule(dt=st.sampled_from([0.0, 0.3 * GRACE, 0.6 * GRACE, 1.2 * GRACE]))
    def advance(self, dt: float) -> None:
        self.offset += dt

    # --- saves ---------------------------------------------------------------------------------

    @rule(world=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
    def begin_and_write_rank0(self, world: int, seed: int) -> None:
        step = self.next_step
        self.next_step += 1
        a = ckpt.begin(self.root, step=step, world_size=world, storage_options=self.opts)
        rep = ckpt.write_shards(
            a, self._rank_state(seed, 0, world), rank=0, storage_options=self.opts
        )
        self.begun += 1
        self.live[self.begun] = Live(a, [rep], self._stamp(rep["files"]), seed, set(rep["files"]))

    @rule(seed=st.integers(0, 2**16))
    def save(self, seed: int) -> None:
        """A whole save in one go (begin, write, commit)."""
        step = self.next_step
        self.next_step += 1
        m = ckpt.save(self.root, self._rank_state(seed, 0, 1), step=step, storage_options=self.opts)
        self._stamp(m.files)
        STATS["commits"] += 1
        self.committed[step] = seed

    @precondition(
        lambda self: any(len(x.reports) < x.attempt.world_size for x in self.live.values())
    )
    @rule(data=st.data())
    def write_next_rank(self, data: st.DataObject) -> None:
        ids = sorted(k for k, x in self.live.items() if len(x.reports) < x.attempt.world_size)
        x = self.live[data.draw(st.sampled_from(ids))]
        rank = len(x.reports)
        rep = ckpt.write_shards(
            x.attempt,
            self._rank_state(x.seed, rank, x.attempt.world_size),
            rank=rank,
            storage_options=self.opts,
        )
        x.reports.append(rep)
        x.files |= set(rep["files"])
        x.last_write = self._stamp(rep["files"])

    @precondition(
        lambda self: any(len(x.reports) == x.attempt.world_size for x in self.live.values())
    )
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        ids = sorted(k for k, x in self.live.items() if len(x.reports) == x.attempt.world_size)
        x = self.live.pop(data.draw(st.sampled_from(ids)))
        try:
            ckpt.commit(x.attempt, x.reports, storage_options=self.opts)
        except CkptError:
            # only an attempt that was older than the grace period at a GC may have lost files
            assert x.maybe_collected, (
                f"commit of attempt {x.attempt.attempt}, never old at a GC, failed"
            )
            assert not self.storage.exists(f"steps/{x.attempt.step:012d}/manifest.json")
            STATS["expired"] += 1
            self.abandoned[f"data/{x.attempt.step:012d}-{x.attempt.attempt}"] = x.last_write
            return
        STATS["commits"] += 1
        self.committed[x.attempt.step] = x.seed

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def abandon(self, data: st.DataObject) -> None:
        """A writer crashes: its files stay, referenced by nothing."""
        x = self.live.pop(data.draw(st.sampled_from(list(self.live))))
        self.abandoned[f"data/{x.attempt.step:012d}-{x.attempt.attempt}"] = x.last_write

    @rule()
    def crashed_commit_temp(self) -> None:
        """A local commit that died between its temp file and the link (local disk only)."""
        if not self.storage.is_local:
            return
        rel = f"steps/{self.next_step:012d}/.manifest.json.{uuid.uuid4().hex}.tmp"
        os.makedirs(os.path.dirname(self.storage.path(rel)), exist_ok=True)
        with open(self.storage.path(rel), "wb") as f:
            f.write(b"{}")
        self.temps[rel] = self._stamp([rel])

    # --- retention and GC ----------------------------------------------------------------------

    @precondition(lambda self: len(self.committed) > 2)
    @rule(keep=st.sampled_from([1, 2]))
    def retain(self, keep: int) -> None:
        doomed = retention.to_retire(
            sorted(self.committed), {}, retention.RetentionPolicy(keep_last=keep)
        )
        done = cleanup.retire_steps(self.storage, doomed)
        for r in done:
            del self.committed[r.step]
        STATS["retired"] += len(done)

    @rule()
    def gc(self) -> None:
        now = self.now()
        before = {f.path for f in self.storage.list_files()}
        protected = self._referenced()
        plan = cleanup.collect_garbage(self.storage, grace_s=GRACE, now=now)
        STATS["gc_runs"] += 1
        STATS["collected"] += len(plan.delete)
        deleted = set(plan.delete)
        assert deleted <= before
        assert not deleted & protected, f"GC deleted referenced files {sorted(deleted & protected)}"
        for x in self.live.values():
            if now - x.last_write < GRACE - SLACK:
                assert not deleted & x.files, (
                    f"GC deleted files of a live attempt {x.attempt.attempt}"
                )
            else:
                x.maybe_collected = True
        # garbage older than the grace period is gone now
        left = {f.path for f in self.storage.list_files()}
        for d, t in self.abandoned.items():
            if now - t > GRACE + SLACK:
                assert not any(p.startswith(d + "/") for p in left), (
                    f"old abandoned attempt {d} not collected"
                )
        for x in self.live.values():
            if (
                now - x.last_write > GRACE + SLACK
            ):  # a live attempt idle past the grace: garbage too
                assert not x.files & left
        for rel, t in self.temps.items():
            if now - t > GRACE + SLACK:
                assert rel not in left, f"old temp file {rel} not collected"
        if self.storage.is_s3:
            assert not [
                u for u in self.storage.multipart_uploads() if u.initiated < now - GRACE - SLACK
            ]

    @rule()
    def stale_multipart_upload(self) -> None:
        """A multipart upload left by a writer that died (S3 only)."""
        if not self.storage.is_s3:
            return
        bucket, key, _ = self.storage.fs.split_path(
            self.storage.path(f"data/{self.next_step:012d}-dead/00000-0.safetensors")
        )
        self.storage.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def committed_steps_restore_and_verify(self) -> None:
        STATS["steps"] += 1
        assert ckpt.list_steps(self.root, storage_options=self.opts) == sorted(self.committed)
        for step in self.committed:
            rep = ckpt.verify(self.root, step, storage_options=self.opts, num_threads=2)
            assert rep.ok, rep.problems
        if self.committed:
            step = max(self.committed)
            back = ckpt.restore(self.root, step, storage_options=self.opts)
            assert back["meta"] == {"seed": self.committed[step]}
            want = self._full(self.committed[step])
            assert torch.equal(back["w"], want)

    @invariant()
    def live_young_attempts_are_intact(self) -> None:
        now = self.now()
        for x in self.live.values():
            if now - x.last_write < GRACE - SLACK and not x.maybe_collected:
                for p in x.files:
                    assert self.storage.exists(p), f"{p} of a live attempt is gone"

    # --- helpers -------------------------------------------------------------------------------

    def _stamp(self, paths: Any) -> float:
        """Give ``paths`` (just written) the model time now as their mtime; return it."""
        t = self.now()
        for p in paths:
            if self.storage.is_local:
                os.utime(self.storage.path(p), (t, t))
            else:
                self.storage.shift[p] = self.offset
        return t

    def _referenced(self) -> set[str]:
        out: set[str] = set()
        for step in self.committed:
            m = ckpt.read_manifest(self.root, step, storage_options=self.opts)
            out |= set(m.files) | {f"steps/{step:012d}/manifest.json"}
        return out

    @staticmethod
    def _full(seed: int) -> torch.Tensor:
        return _tensor_state(seed)["w"]

    def _rank_state(self, seed: int, rank: int, world: int) -> dict[str, Any]:
        full = self._full(seed)
        rows = full.shape[0] // world
        out: dict[str, Any] = {
            "w": ckpt.Shard(
                full[rank * rows : (rank + 1) * rows].clone(), tuple(full.shape), (rank * rows, 0)
            )
        }
        if rank == 0:
            out["meta"] = {"seed": seed}
        return out


def _run_machine(root: str, opts: dict[str, Any], *, examples: int, steps: int) -> None:
    machine = type("GcMachineRun", (GcMachine,), {"root": root, "opts": opts})

    class Roots(machine):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            # a fresh root per example
            self.root = f"{root}/{uuid.uuid4().hex[:8]}"
            super().__init__()

    Roots.TestCase.settings = settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck), database=None,
    )  # fmt: skip
    Roots.TestCase().runTest()


def test_gc_interleavings_local(tmp_path: Any) -> None:
    _run_machine(str(tmp_path / "root"), {}, examples=12, steps=25)
    assert STATS["collected"] > 0
    assert STATS["commits"] > 0


@pytest.mark.s3
def test_gc_interleavings_s3(s3_endpoint: str) -> None:
    opts = s3_options(s3_endpoint)
    bucket = f"ckpt-gc-{uuid.uuid4().hex[:10]}"
    fsspec.filesystem("s3", **opts).call_s3("create_bucket", Bucket=bucket)
    _run_machine(f"s3://{bucket}/run", opts, examples=3, steps=12)


@pytest.mark.stress
@pytest.mark.timeout(1800)  # minutes on 2 loaded cores: beyond the suite's 300 s per test
def test_gc_interleavings_local_long(tmp_path: Any) -> None:
    _run_machine(str(tmp_path / "root"), {}, examples=300, steps=50)


@pytest.mark.stress
@pytest.mark.s3
@pytest.mark.timeout(1800)  # minutes on 2 loaded cores: beyond the suite's 300 s per test
def test_gc_interleavings_s3_long(s3_endpoint: str) -> None:
    opts = s3_options(s3_endpoint)
    bucket = f"ckpt-gc-{uuid.uuid4().hex[:10]}"
    fsspec.filesystem("s3", **opts).call_s3("create_bucket", Bucket=bucket)
    _run_machine(f"s3://{bucket}/run", opts, examples=30, steps=30)


# --- real threads: a saver and a collector at once -------------------------------------------


def _threads(root: str, *, seconds: float, grace: float, seed: int) -> None:
    """A saver thread (saves of 2 ranks with a pause between them; some abandoned midway;
    retention after commits) and a GC thread (collect with a real-time grace period) run for
    ``seconds``. The GC thread checks each plan against what the saver has registered."""
    rng = random.Random(seed)
    lock = threading.Lock()
    started: dict[str, float] = {}  # live attempt dir -> real time its newest write began
    committed: dict[int, int] = {}  # step -> seed
    referenced: set[str] = set()  # files of committed, unretired steps
    errors: list[BaseException] = []
    stop = threading.Event()
    st_ = open_storage(root)

    def saver() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            s = rng.getrandbits(16)
            full = _tensor_state(s)["w"]
            a = ckpt.begin(root, step=step, world_size=2)
            d = f"data/{step:012d}-{a.attempt}"
            reps = []
            for rank in range(2):
                with lock:
                    started[d] = time.time()
                part = {
                    "w": ckpt.Shard(full[rank * 8 : (rank + 1) * 8].clone(), (16, 4), (rank * 8, 0))
                }
                if rank == 0:
                    part["meta"] = {"seed": s}  # type: ignore[assignment]
                reps.append(ckpt.write_shards(a, part, rank=rank))
                time.sleep(rng.uniform(0, grace / 10))
            if rng.random() < 0.3:  # a crashed writer: the attempt is left behind
                with lock:
                    started.pop(d)
                continue
            m = ckpt.commit(a, reps)
            with lock:
                started.pop(d)
                committed[step] = s
                referenced.update(m.files)
            STATS["thread_saves"] += 1
            assert ckpt.verify(root, step).ok
            if len(committed) > 3:  # retention: forget the manifest's files first, then retire
                doomed = retention.to_retire(
                    sorted(committed), {}, retention.RetentionPolicy(keep_last=2)
                )
                with lock:
                    keep = set()
                    for s_ in committed:
                        if s_ not in doomed:
                            keep |= set(ckpt.read_manifest(root, s_).files)
                    referenced.intersection_update(keep)
                    for s_ in doomed:
                        committed.pop(s_)
                cleanup.retire_steps(st_, doomed)

    def collector() -> None:
        while not stop.is_set():
            with lock:
                protected = set(referenced)
            now = time.time()
            plan = cleanup.collect_garbage(st_, grace_s=grace, now=now)
            STATS["thread_gcs"] += 1
            STATS["thread_collected"] += len(plan.delete)
            with lock:
                young = {d for d, t in started.items() if t > now - grace}
            bad = [p for p in plan.delete if p in protected or os.path.dirname(p) in young]
            assert not bad, f"GC deleted live or referenced files: {bad}"
            time.sleep(rng.uniform(0, grace / 5))

    def guarded(fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except BaseException as err:
                errors.append(err)
                stop.set()

        return run

    threads = [threading.Thread(target=guarded(saver)), threading.Thread(target=guarded(collector))]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    # afterwards: every committed step restores; once the grace has passed, no garbage is left
    for step, s in committed.items():
        back = ckpt.restore(root, step)
        assert back["meta"] == {"seed": s}
        assert torch.equal(back["w"], _tensor_state(s)["w"])
    plan = cleanup.collect_garbage(st_, grace_s=grace, now=time.time() + grace + 1)
    STATS["thread_collected"] += len(plan.delete)
    left = [f.path for f in st_.list_files() if f.path.startswith("data/")]
    assert set(left) == set(referenced), sorted(set(left) ^ set(referenced))
    assert sorted(committed) == ckpt.list_steps(root)


def test_gc_thread_beside_saver_thread(tmp_path: Any) -> None:
    _threads(str(tmp_path / "run"), seconds=6.0, grace=1.0, seed=1)
    assert STATS["thread_collected"] > 0


@pytest.mark.stress
@pytest.mark.timeout(1800)  # minutes on 2 loaded cores: beyond the suite's 300 s per test
def test_gc_thread_beside_saver_thread_long(tmp_path: Any) -> None:
    for i in range(5):
        _threads(str(tmp_path / f"run{i}"), seconds=30.0, grace=0.5 + i / 4, seed=i)


def test_zz_report_counts() -> None:
    """Not a check: prints what this module ran (run with -s to see it)."""
    print(f"\ngc stress: {STATS}")
