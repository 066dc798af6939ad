"""A fork server for crash tests: a fresh interpreter that imports torch and ckpt once, then forks
one real child process per trial, so that a hundred SIGKILL trials do not pay a hundred
interpreter starts. The test kills the children itself (``os.kill(pid, SIGKILL)``) and asks the
server to reap them.

Protocol (one JSON object per line on stdin/stdout): ``{"run": "module:function", "args": [...]}``
(``module`` importable from the repo root, e.g. ``tests.support.crash_loops``)
-> ``{"pid": N}``; the child calls the function, prints nothing on the server's stdout, and exits
0 (or 1 with the traceback on stderr). ``{"reap": N}`` -> ``{"pid": N, "status": S}`` where S is
``-signal`` or the exit code.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def serve() -> None:
    import torch  # imported once, before any fork

    import ckpt  # noqa: F401

    # An optimizer's first step imports a lot lazily (~1 s): do it once here, on a tiny tensor
    # (no intra-op thread pool starts), so that children start training at once.
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    torch.optim.AdamW([p]).step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if "reap" in req:
            _, status = os.waitpid(req["reap"], 0)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            print(json.dumps({"pid": req["reap"], "status": code}), flush=True)
            continue
        pid = os.fork()
        if pid == 0:  # the child: run, never return into the server loop
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            try:
                mod, fn = req["run"].split(":")
                getattr(importlib.import_module(mod), fn)(*req["args"])
                code = 0
            except SystemExit as stop:  # e.g. the manager's preemption exit code
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)


class Forker:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def _ask(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return dict(json.loads(line))

    def start(self, target: str, *args: Any) -> int:
        return int(self._ask({"run": target, "args": list(args)})["pid"])

    def reap(self, pid: int) -> int:
        return int(self._ask({"reap": pid})["status"])


@contextmanager
def forker(env: dict[str, str] | None = None) -> Iterator[Forker]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join([repo, full_env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tests.support import forker; forker.serve()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full_env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        if not ready:
            raise RuntimeError("the fork server did not start")
        yield Forker(proc)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def line_count(path: str) -> int:
    """The lines of a child's log so far (0 before it exists)."""
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def finished(pid: int) -> bool:
    """Whether the child ``pid`` has exited (a zombie not yet reaped, or gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


# --- process-group scenarios: one forked child per rank ----------------------------------------


def rank_scenario(rank: int, out: str, body: Callable[[dict[str, Any]], None]) -> None:
    """In a rank's child: ``body(seen)`` then a barrier; ``seen`` (with the traceback of an
    error) is written to ``out`` as JSON whatever happens, and the process group destroyed."""
    import torch.distributed as dist

    seen: dict[str, Any] = {"rank": rank}
    try:
        body(seen)
        dist.barrier()
    except BaseException:
        seen["error"] = traceback.format_exc()
        raise
    finally:
        with open(out, "w") as f:
            json.dump(seen, f)
        dist.destroy_process_group()


def run_ranks(fk: Forker, target: str, args: Callable[[int, str, str], list[Any]], world: int, tmp: str,
              name: str) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """Start ``target`` on ``world`` forked ranks (``args(rank, init_file, out)`` its arguments),
    reap them, and return what each rank saw and the paths of their outputs; fails naming the
    ranks' errors unless every rank exited 0."""
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    init, out = os.path.join(tmp, f"init-{tag}"), os.path.join(tmp, tag)
    outs = [f"{out}-{r}.json" for r in range(world)]
    pids = [fk.start(target, *args(r, init, outs[r])) for r in range(world)]
    statuses = [fk.reap(p) for p in pids]
    seen = []
    for o in outs:
        try:
            with open(o) as f:
                seen.append(json.load(f))
        except FileNotFoundError:
            seen.append({"error": "no output"})
    errors = [s["error"] for s in seen if "error" in s]
    assert statuses == [0] * world, "\n".join(errors) or "a rank died (its traceback is on stderr)"
    return seen, outs
