"""The fault matrix (reliability.md 5.1 items 1-4, 17): every storage operation of a save and of a
restore, times every fault kind, at the storage contract: ``ckpt.testing.FaultyStorage`` around
the real ``LocalStorage`` of a local directory (``wrap_storage``: ckpt's entry points build it
for the faulted root), so the production local code (O_EXCL writes, the link commit, preadv) is
what runs under the faults. A short object-store variant runs a handful of points (a data write,
the manifest commit, the manifest read, a data read) over the real ``S3Storage`` on a moto server
and the real ``AzureStorage`` on Azurite.

Save: two writers (ranks 0 and 1, in one process, or in a forked child for kills) save step 3 of
a root that already holds the committed steps 1 and 2, then retention retires step 1. Faults hit
the begin check (``exists``), each shard file write of each rank (``write_file``), the commit's
stats (``size``), the manifest commit (``put_if_absent``), the LATEST read and write (``read``,
``put``), and each retention delete (``delete``). Restore: the newest step is restored with a
fault at the listing (``list_files``), the manifest stat and read (``size``, ``read``), and each
data stat and read of each rank (``size``, ``read_into``).

Fault kinds: ``oserror`` (EIO), ``transient`` (ConnectionResetError), ``lost`` (the operation took
effect, then the error: a lost response), ``delay``, ``hang`` (until released, with a short
``io_timeout_s``), ``truncate`` (short reads; torn shard writes), ``kill`` (SIGKILL of the
process at that operation, in a child forked from tests/support/forker.py).

After each: every committed step restores bitwise and verifies; the new step is listed only if
its manifest was written, and then restores to exactly its data; a failure is a typed ckpt error
naming the file; no call outlives its timeout. A summary per backend (cases, faults injected,
kills, operations covered) is printed at the end of the module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import shutil
import signal
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
import ckpt.storage
from ckpt.lifecycle import cleanup
from ckpt.testing import Call, Recorder, Rule, wrap_storage

TIMEOUT_S = 0.4  # io_timeout_s of the faulted operations in hang cases (local)
OBJ_TIMEOUT_S = 6.0  # the same over moto: a loaded machine's plain request (a listing) has taken over 3 s
SAVE_OPTS = ckpt.SaveOptions(parallel_files=2, min_file_bytes=1, num_threads=2, fsync=False, io_timeout_s=TIMEOUT_S)
RESTORE_OPTS = ckpt.RestoreOptions(num_threads=2, io_timeout_s=TIMEOUT_S, read_chunk_bytes=256)
SETUP_OPTS = dataclasses.replace(SAVE_OPTS, io_timeout_s=60.0)  # unfaulted saves (template, retries)
NEW = 3  # the step the faulted save writes; steps 1 and 2 are committed before


def rank_state(step: int, rank: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step * 10 + rank)
    part: dict[str, Any] = {"a": torch.randn(64, generator=g), "b": torch.randint(0, 1 << 30, (48,), generator=g)}
    return {f"r{rank}": part, "meta": {"step": step}} if rank == 0 else {f"r{rank}": part}


def full_state(step: int) -> dict[str, Any]:
    return {**rank_state(step, 0), **rank_state(step, 1)}


def save_step(root: str, step: int, opts: dict[str, Any] | None, options: ckpt.SaveOptions = SAVE_OPTS) -> None:
    """A two-writer save: begin, write_shards of rank 0 and rank 1, commit."""
    a = ckpt.begin(root, step=step, world_size=2, options=options, storage_options=opts)
    reports = [ckpt.write_shards(a, rank_state(step, r), rank=r, storage_options=opts) for r in (0, 1)]
    ckpt.commit(a, reports, storage_options=opts)


def save_and_retire(root: str, opts: dict[str, Any] | None, timeout_s: float = TIMEOUT_S) -> None:
    """The faulted workload: save step NEW, then retire step 1 (keep the newest two)."""
    save_step(root, NEW, opts, dataclasses.replace(SAVE_OPTS, io_timeout_s=timeout_s))
    cleanup.retire_steps(ckpt.storage.open_storage(root, opts, io_timeout_s=timeout_s), [1])


# --- operation points ---------------------------------------------------------------------------


def _ends(suffix: str) -> Callable[[Call], bool]:
    return lambda c: bool(re.search(suffix, c.path))


@dataclass(frozen=True)
class Point:
    name: str
    op: str
    path_contains: str = ""
    rank: int | None = None
    suffix: str | None = None  # regex the path must match
    names: str = ""  # what the error message must contain
    stage: str = "pre"  # save: pre (before the commit), latest_read, latest_write, retire_manifest, retire_data

    def rule(self, **kw: Any) -> Rule:
        when = _ends(self.suffix) if self.suffix else None
        return Rule(self.op, path_contains=self.path_contains, rank=self.rank, when=when, times=1, **kw)


SAVE_POINTS = [
    Point("begin_exists", "exists", "steps/000000000003/manifest.json", names="manifest.json"),
    *[
        Point(f"shard_write_r{r}_f{k}", "write_file", f"-{k}.safetensors", rank=r, names=f"{r:05d}-{k}.safetensors")
        for r in (0, 1) for k in (0, 1)
    ],
    Point("commit_stat_r1", "size", "-1.safetensors", rank=1, names="00001-1.safetensors"),
    Point("manifest_write", "put_if_absent", "manifest.json", names="manifest.json"),
    Point("latest_read", "read", "LATEST", stage="latest_read"),
    Point("latest_write", "put", "LATEST", names="LATEST", stage="latest_write"),
    Point("retire_manifest_rm", "delete", "steps/000000000001/manifest.json", names="manifest.json", stage="retire_manifest"),
    *[
        Point(f"retire_data_rm_r{r}", "delete", "data/000000000001-", rank=r, names=f"{r:05d}-", stage="retire_data")
        for r in (0, 1)
    ],
]
RESTORE_POINTS = [
    Point("listing", "list_files", "steps", names="steps"),
    Point("manifest_stat", "size", "manifest.json", names="manifest.json"),
    Point("manifest_read", "read", "manifest.json", names="manifest.json"),
    *[Point(f"data_stat_r{r}", "size", ".safetensors", rank=r, names=f"{r:05d}-") for r in (0, 1)],
    *[Point(f"data_read_r{r}", "read_into", ".safetensors", rank=r, names=f"{r:05d}-") for r in (0, 1)],
]
WRITES = ("write_file", "put_if_absent", "put", "delete")  # operations that take effect
READS = ("read", "read_into")
_BY_NAME = {("save", p.name): p for p in SAVE_POINTS} | {("restore", p.name): p for p in RESTORE_POINTS}

KINDS = ["oserror", "transient", "lost", "delay", "hang", "truncate", "kill"]


def fault_rule(phase: str, point_name: str, kind: str) -> Rule:
    p = _BY_NAME[(phase, point_name)]
    if kind == "oserror":
        return p.rule(error=lambda: OSError(errno.EIO, "injected I/O error"))
    if kind == "transient":
        return p.rule(error=lambda: ConnectionResetError(errno.ECONNRESET, "injected connection reset"))
    if kind == "lost":
        return p.rule(error=lambda: OSError(errno.EIO, "injected lost response"), after=True)
    if kind == "delay":
        return p.rule(delay_s=0.05)
    if kind == "hang":  # released at teardown; then it fails rather than landing late
        return p.rule(hang=True, error=lambda: OSError(errno.EIO, "released hang"))
    if kind == "truncate":
        return p.rule(truncate_to=7)
    if kind == "kill":
        return p.rule(kill=True)
    raise AssertionError(kind)


def applies(phase: str, p: Point, kind: str) -> bool:
    if kind == "truncate":  # short reads; torn writes of shard files (a torn manifest needs a non-atomic backend)
        return p.op in READS if phase == "restore" else p.name.startswith("shard_write")
    if kind == "lost":  # a write or delete that landed, its response lost
        return phase == "save" and p.op in WRITES
    return True


SAVE_CASES = [(p.name, k) for p in SAVE_POINTS for k in KINDS if applies("save", p, k)]
RESTORE_CASES = [(p.name, k) for p in RESTORE_POINTS for k in KINDS if applies("restore", p, k)]


# --- bookkeeping ----------------------------------------------------------------------------------

STATS: Counter[tuple[str, str]] = Counter()  # (backend, "cases" / "faults" / "kills")
COVERED: set[tuple[str, str, str]] = set()  # (backend, phase, point)
KINDS_SEEN: set[tuple[str, str]] = set()  # (backend, kind)


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = []
    for backend in ("local", "s3", "gcs", "azure"):
        covered = [(ph, pt) for b, ph, pt in COVERED if b == backend]
        if not covered:
            continue
        lines.append(
            f"fault matrix ({backend}): {STATS[backend, 'cases']} cases, {STATS[backend, 'faults']} faults injected "
            f"({STATS[backend, 'kills']} kills), {len(covered)} storage operations covered "
            f"({sum(1 for ph, _ in covered if ph == 'save')} save, {sum(1 for ph, _ in covered if ph == 'restore')} restore), "
            f"{sum(1 for b, _ in KINDS_SEEN if b == backend)} fault kinds"
        )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown in every run, not only with -rA
            tr.write_line("")
            for line in lines:
                tr.write_line(line)
    out = os.environ.get("CKPT_FAULT_MATRIX_SUMMARY")
    if out:
        Path(out).write_text("".join(line + "\n" for line in lines))


def _count(backend: str, phase: str, point: str, kind: str, injected: int) -> None:
    assert injected >= 1, f"{backend} {phase} {point} {kind}: the fault never fired (the operation was not reached)"
    STATS[backend, "cases"] += 1
    STATS[backend, "faults"] += injected
    STATS[backend, "kills"] += kind == "kill"
    COVERED.add((backend, phase, point))
    KINDS_SEEN.add((backend, kind))


# --- roots ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A checkpoint root holding the committed steps 1 and 2, on a real backend."""

    backend: str
    root: str
    opts: dict[str, Any] | None = None
    timeout_s: float = TIMEOUT_S  # io_timeout_s of the faulted operations (hang cases)

    @property
    def restore_options(self) -> ckpt.RestoreOptions:
        return dataclasses.replace(RESTORE_OPTS, io_timeout_s=self.timeout_s)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local root holding the committed steps 1 and 2 (written once, copied per case)."""
    root = tmp_path_factory.mktemp("template") / "run"
    for step in (1, 2):
        save_step(str(root), step, None, SETUP_OPTS)
    return root


@pytest.fixture
def local_target(template: Path, tmp_path: Path) -> Target:
    d = tmp_path / "run"
    shutil.copytree(template, d)
    return Target("local", str(d))


@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.s3), pytest.param("azure", marks=pytest.mark.azure)])
def obj_target(request: pytest.FixtureRequest) -> Target:
    """A fresh bucket on the moto endpoint (or container on Azurite), with the committed steps 1 and 2."""
    store = request.getfixturevalue(f"{request.param}_store")
    for step in (1, 2):
        save_step(store.root, step, store.opts, SETUP_OPTS)
    return Target(request.param, store.root, store.opts, OBJ_TIMEOUT_S)


@pytest.fixture
def gcs_target(gcs_store: Any) -> Target:
    """A fresh bucket on fake-gcs-server, with the committed steps 1 and 2."""
    for step in (1, 2):
        save_step(gcs_store.root, step, gcs_store.opts, SETUP_OPTS)
    return Target("gcs", gcs_store.root, gcs_store.opts, OBJ_TIMEOUT_S)


@contextlib.contextmanager
def faulted(t: Target, rule: Rule | None) -> Iterator[Recorder]:
    """ckpt's entry points on ``t.root`` run over FaultyStorage (the rule) around the real backend."""
    with wrap_storage(Recorder(rules=[rule] if rule else []), only=t.root) as rec:
        yield rec


def assert_step(t: Target, step: int, *, newest: bool = False) -> None:
    """``step`` restores bitwise to its state and verifies (no faults: the plain backend)."""
    back = ckpt.restore(t.root, None if newest else step, storage_options=t.opts)
    want = full_state(step)
    assert back["meta"] == want["meta"], f"step {step}: got the state of step {back['meta']}"
    for r in (0, 1):
        for k in ("a", "b"):
            got, exp = back[f"r{r}"][k], want[f"r{r}"][k]
            assert got.dtype == exp.dtype, f"step {step} r{r}.{k}"
            assert got.shape == exp.shape, f"step {step} r{r}.{k}"
            assert got.numpy().tobytes() == exp.numpy().tobytes(), f"step {step} r{r}.{k}: not bitwise equal"
    report = ckpt.verify(t.root, step, storage_options=t.opts)
    assert report.ok, f"step {step}: {report}"


def check_invariants(t: Target, *, new_committed: bool | None, old_retired: bool | None) -> None:
    """Committed steps intact; the new step listed iff its manifest was written (None: either,
    its manifest is then checked like every committed step's); newest exact."""
    steps = ckpt.list_steps(t.root, storage_options=t.opts)
    if new_committed is not None:
        assert (NEW in steps) == new_committed, f"steps {steps}: step {NEW} should {'' if new_committed else 'not '}be listed"
    assert 2 in steps, f"steps {steps}: the committed step 2 is lost"
    if old_retired is not None:
        assert (1 not in steps) == old_retired, f"steps {steps}: step 1 retired should be {old_retired}"
    for s in steps:
        assert_step(t, s)
    assert_step(t, max(steps), newest=True)


def assert_typed(err: BaseException, names: str) -> None:
    assert isinstance(err, ckpt.CkptError), f"{type(err).__name__} is not a ckpt error: {err}"
    assert names in str(err), f"the error does not name {names!r}: {err}"


# --- save -----------------------------------------------------------------------------------------


def _save_expectation(p: Point, kind: str) -> tuple[bool, bool, bool | None, str | None]:
    """(raises, new step committed, step 1 retired (None: either), warning expected)."""
    failing = kind in ("oserror", "transient", "lost", "hang", "truncate")
    if p.stage == "pre":
        landed = kind == "lost" and p.name == "manifest_write"  # committed, then the response was lost
        return failing, landed or not failing, not failing, None
    if p.stage == "latest_read":  # a hint: a failed read is rewritten
        return False, True, True, None
    if p.stage == "latest_write":  # committed; the hint not updated is a warning
        return False, True, True, "LATEST hint was not updated" if failing else None
    if p.stage == "retire_manifest":
        return failing, True, (kind == "lost") if failing else True, None
    return failing, True, True, None  # retire_data: the manifest is gone already


def run_save_fault(t: Target, point: str, kind: str) -> None:
    p = _BY_NAME[("save", point)]
    t0 = time.monotonic()
    raised: BaseException | None = None
    with faulted(t, fault_rule("save", point, kind)) as rec:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    save_and_retire(t.root, t.opts, t.timeout_s)
                except Exception as err:  # checked below
                    raised = err
            elapsed = time.monotonic() - t0
            assert elapsed < 10 * t.timeout_s + 5, f"took {elapsed:.1f} s: a wait outlived its timeout"
        finally:
            rec.release()
    # a transient error may be retried by the storage layer (then it is as if nothing failed)
    msgs = [str(w.message) for w in caught if issubclass(w.category, ckpt.CkptWarning)]
    outcome = "delay" if kind == "transient" and raised is None and not msgs else kind
    raises, committed, retired, warning = _save_expectation(p, outcome)
    if raises:
        assert raised is not None, f"{point} {kind}: the save did not fail"
        assert_typed(raised, p.names)
        if kind == "hang":
            assert isinstance(raised, ckpt.StorageTimeoutError), repr(raised)
    elif raised is not None:
        raise raised
    if warning:
        assert any(warning in m for m in msgs), msgs
    else:
        assert not msgs, msgs
    _count(t.backend, "save", point, kind, len(rec.injected))
    check_invariants(t, new_committed=committed, old_retired=retired)


@pytest.mark.parametrize(("point", "kind"), [c for c in SAVE_CASES if c[1] != "kill"])
def test_save_fault(point: str, kind: str, local_target: Target) -> None:
    run_save_fault(local_target, point, kind)


# --- restore --------------------------------------------------------------------------------------

_RESTORE_ERRORS: dict[str, type[BaseException]] = {
    "oserror": ckpt.StorageError,
    "transient": ckpt.StorageError,
    "hang": ckpt.StorageTimeoutError,
    "truncate": ckpt.CkptError,  # a short read: ShardSizeMismatchError (data) or StorageError (manifest)
}


def run_restore_fault(t: Target, point: str, kind: str) -> None:
    p = _BY_NAME[("restore", point)]
    t0 = time.monotonic()
    failed: BaseException | None = None
    back: dict[str, Any] = {}
    with faulted(t, fault_rule("restore", point, kind)) as rec:
        try:
            back = ckpt.restore(t.root, options=t.restore_options, storage_options=t.opts)
        except Exception as err:  # never an older step, never partial data
            failed = err
        finally:
            rec.release()
    elapsed = time.monotonic() - t0
    assert elapsed < 10 * t.timeout_s + 5, f"took {elapsed:.1f} s: a wait outlived its timeout"
    if kind == "delay":
        if failed is not None:
            raise failed
        assert back["meta"] == {"step": 2}
        assert torch.equal(back["r1"]["a"], full_state(2)["r1"]["a"])
    elif failed is None:  # only a transient error may be retried away
        assert kind == "transient", f"{point} {kind}: the restore did not fail"
        assert back["meta"] == {"step": 2}
    else:
        assert isinstance(failed, _RESTORE_ERRORS[kind]), repr(failed)
        assert_typed(failed, p.names)
    _count(t.backend, "restore", point, kind, len(rec.injected))
    check_invariants(t, new_committed=False, old_retired=False)


@pytest.mark.parametrize(("point", "kind"), [c for c in RESTORE_CASES if c[1] != "kill"])
def test_restore_fault(point: str, kind: str, local_target: Target) -> None:
    run_restore_fault(local_target, point, kind)


# --- kills (real processes) -----------------------------------------------------------------------


def child_save(root: str, opts: dict[str, Any] | None, point: str, after: bool, timeout_s: float) -> None:
    """In a forked child: the faulted save of step NEW plus retention, dying at ``point``."""
    rule = fault_rule("save", point, "kill")
    rule.after = after
    with wrap_storage(Recorder(rules=[rule]), only=root):
        save_and_retire(root, opts, timeout_s)


def child_restore(root: str, opts: dict[str, Any] | None, point: str, timeout_s: float) -> None:
    with wrap_storage(Recorder(rules=[fault_rule("restore", point, "kill")]), only=root):
        ckpt.restore(root, options=dataclasses.replace(RESTORE_OPTS, io_timeout_s=timeout_s), storage_options=opts)


@pytest.fixture(scope="module")
def fork_server() -> Iterator[Any]:
    from tests.support.forker import forker

    with forker() as fk:
        yield fk


def run_save_killed(t: Target, point: str, after: bool, fork_server: Any) -> None:
    p = _BY_NAME[("save", point)]
    pid = fork_server.start(f"{__name__}:child_save", t.root, t.opts, point, after, t.timeout_s)
    status = fork_server.reap(pid)
    assert status == -signal.SIGKILL, f"the child was not killed at {point} (exit {status})"
    _count(t.backend, "save", point, "kill", 1)
    committed: bool | None = p.stage != "pre" or (after and point == "manifest_write")
    retired = p.stage == "retire_data" or (after and p.stage == "retire_manifest")
    if p.stage == "latest_read":  # LATEST is read while the manifest is written: killed before or after it lands
        committed = None
    check_invariants(t, new_committed=committed, old_retired=retired)
    # a retry after the crash works: the same step if it was not committed, else the next one
    step = NEW + 1 if NEW in ckpt.list_steps(t.root, storage_options=t.opts) else NEW
    save_step(t.root, step, t.opts, SETUP_OPTS)
    assert_step(t, step, newest=True)


def run_restore_killed(t: Target, point: str, fork_server: Any) -> None:
    pid = fork_server.start(f"{__name__}:child_restore", t.root, t.opts, point, t.timeout_s)
    status = fork_server.reap(pid)
    assert status == -signal.SIGKILL, f"the child was not killed at {point} (exit {status})"
    _count(t.backend, "restore", point, "kill", 1)
    check_invariants(t, new_committed=False, old_retired=False)


_KILL_CASES = [(p, False) for p, k in SAVE_CASES if k == "kill"] + [("manifest_write", True), ("latest_write", True)]


@pytest.mark.parametrize(("point", "after"), _KILL_CASES)
def test_save_killed(point: str, after: bool, local_target: Target, fork_server: Any) -> None:
    run_save_killed(local_target, point, after, fork_server)


@pytest.mark.parametrize("point", [p for p, k in RESTORE_CASES if k == "kill"])
def test_restore_killed(point: str, local_target: Target, fork_server: Any) -> None:
    run_restore_killed(local_target, point, fork_server)


# --- object stores: a handful of points over the real S3 (moto) and Azure (Azurite) backends -------

OBJ_SAVE_POINTS = ("shard_write_r1_f0", "manifest_write")  # a data write, the manifest commit
OBJ_RESTORE_POINTS = ("manifest_read", "data_read_r1")  # the manifest read, a data read
OBJ_SAVE_CASES = [c for c in SAVE_CASES if c[0] in OBJ_SAVE_POINTS]
OBJ_RESTORE_CASES = [c for c in RESTORE_CASES if c[0] in OBJ_RESTORE_POINTS]


@pytest.mark.parametrize(("point", "kind"), [c for c in OBJ_SAVE_CASES if c[1] != "kill"])
def test_obj_save_fault(point: str, kind: str, obj_target: Target) -> None:
    run_save_fault(obj_target, point, kind)


@pytest.mark.parametrize(("point", "kind"), [c for c in OBJ_RESTORE_CASES if c[1] != "kill"])
def test_obj_restore_fault(point: str, kind: str, obj_target: Target) -> None:
    run_restore_fault(obj_target, point, kind)


@pytest.mark.parametrize(("point", "after"), [(p, False) for p in OBJ_SAVE_POINTS] + [("manifest_write", True)])
def test_obj_save_killed(point: str, after: bool, obj_target: Target, fork_server: Any) -> None:
    run_save_killed(obj_target, point, after, fork_server)


@pytest.mark.parametrize("point", OBJ_RESTORE_POINTS)
def test_obj_restore_killed(point: str, obj_target: Target, fork_server: Any) -> None:
    run_restore_killed(obj_target, point, fork_server)


# --- GCS: the same handful of points over the real GCS backend (fake-gcs-server) --------------------


@pytest.mark.gcs
@pytest.mark.parametrize(("point", "kind"), [c for c in OBJ_SAVE_CASES if c[1] != "kill"])
def test_gcs_save_fault(point: str, kind: str, gcs_target: Target) -> None:
    run_save_fault(gcs_target, point, kind)


@pytest.mark.gcs
@pytest.mark.parametrize(("point", "kind"), [c for c in OBJ_RESTORE_CASES if c[1] != "kill"])
def test_gcs_restore_fault(point: str, kind: str, gcs_target: Target) -> None:
    run_restore_fault(gcs_target, point, kind)


@pytest.mark.gcs
@pytest.mark.parametrize(("point", "after"), [("manifest_write", False), ("manifest_write", True)])
def test_gcs_save_killed(point: str, after: bool, gcs_target: Target, fork_server: Any) -> None:
    run_save_killed(gcs_target, point, after, fork_server)
