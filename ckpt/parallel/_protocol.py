"""The coordinated save protocol, written once; torch.distributed and Ray are transports under it.

One coordinator and ``world_size`` writers (ranks)::

    coordinator: begin ──broadcast──▶ every writer learns the attempt
    writers: describe ──gather──▶ coordinator: holders ──broadcast──▶ (plain_tensors="auto" only)
    writers: write_shards ──gather──▶ coordinator: commit ──broadcast──▶ every party: step or error

A :class:`Transport` carries the messages. Everything it carries is a JSON-able :data:`Msg` (the
writers' reports keep their JSON wire form; attempts and holders travel as plain records) and
never a credential: each party passes its own ``storage_options``. As in DCP's ``_DistWrapper``,
a failure anywhere becomes a message, not a hang: a writer's exception is its reply, the
coordinator's is its broadcast, so every party raises the same :class:`WorkerFailedError`
naming the failed ranks; and every transport bounds its waits, naming the ranks that are gone.

The Ray SPMD coordinator actor is not a participant that runs this sequence (ranks call it; it
answers), so it uses the parts directly: :func:`writer_reply`, :func:`close` and :func:`settle`.

Pure glue: no torch.distributed, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, cast

from ckpt.errors import WorkerFailedError
from ckpt.format.manifest import Manifest
from ckpt.lifecycle import attempt as attempt_mod
from ckpt.lifecycle import save as saver
from ckpt.lifecycle.attempt import Attempt
from ckpt.options import SaveOptions

Msg = dict[str, Any]
"""One JSON-able message. A writer replies ``{"ok": value}`` or ``{"error": text}``; the
coordinator sends ``{"attempt": ...}``, ``{"plan": ...}`` or ``{"step": n}``, or for a failed save
``{"failed": {rank: text}}`` (writers failed) or ``{"error": text}`` (the coordinator failed)."""

WriterStep = Literal["describe", "write"]
PlainMode = Literal["auto", "exclusive", "replicated"]


class Transport(Protocol):
    """The collectives the protocol needs; every wait is bounded (a transport raises
    WorkerFailedError naming the ranks that are gone, or an error its caller turns into one)."""

    rank: int | None
    """This party's writer rank; None for a coordinator that holds no state (the Ray driver):
    such a coordinator raises its own errors as they are, since no writer waits on it."""
    world_size: int
    coordinator: bool

    def broadcast(self, msg: Msg | None) -> Msg:
        """The coordinator's ``msg`` on every party (the others pass None)."""
        ...

    def gather(self, step: WriterStep, payload: Msg) -> dict[int, Msg] | None:
        """Every writer runs :func:`writer_reply` ``(step, its state, its rank, payload)``; the
        coordinator gets the replies by rank (a failed or silent writer: an ``error`` reply; once
        one failed, the others may be left out), the other parties None."""
        ...


def failure_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


attempt_wire = attempt_mod.to_wire
attempt_from = attempt_mod.from_wire


def plan_wire(plain: saver.PlainTensors) -> Any:
    if isinstance(plain, str):
        return plain
    return {k: [list(h.ranks), h.dtype, list(h.shape)] for k, h in plain.items()}


def plan_from(wire: Any) -> saver.PlainTensors:
    if isinstance(wire, str):
        return cast(saver.PlainTensors, wire)
    return {k: saver.Held(tuple(r), d, tuple(s)) for k, (r, d, s) in wire.items()}


def writer_reply(
    step: WriterStep, state: Callable[[], object], rank: int, payload: Msg, storage_options: dict[str, Any] | None
) -> Msg:
    """A writer's part of ``step``, its failure included: ``{"ok": ...}`` or ``{"error": text}``."""
    try:
        if step == "describe":
            return {"ok": saver.describe(state())}
        report = saver.write_shards(attempt_from(payload["attempt"]), state(), rank=rank,
                                    plain_tensors=plan_from(payload["plan"]), storage_options=storage_options)  # fmt: skip
        return {"ok": report}
    except Exception as err:
        return {"error": failure_text(err)}


def _failed(replies: Mapping[int, Msg]) -> Msg | None:
    failed = {str(r): str(m["error"]) for r, m in sorted(replies.items()) if "error" in m}
    return {"failed": failed} if failed else None


def close(
    attempt: Attempt, replies: Mapping[int, Msg], storage_options: dict[str, Any] | None, *, raise_errors: bool = False
) -> tuple[Msg, Manifest | None]:
    """The coordinator's end: commit when every writer reported, else name the failed ranks.
    Returns the outcome message and the manifest (None unless committed)."""
    failed = _failed(replies)
    if failed:
        return failed, None
    try:
        m = saver.commit(attempt, [replies[r]["ok"] for r in sorted(replies)], storage_options=storage_options)
    except Exception as err:
        if raise_errors:
            raise
        return {"error": f"commit failed: {failure_text(err)}"}, None
    return {"step": m.step}, m


def settle(msg: Msg, step: int) -> Msg:
    """The coordinator's ``msg``, or the WorkerFailedError it carries (raised alike everywhere)."""
    if "failed" in msg:
        failed = {int(r): str(m) for r, m in msg["failed"].items()}
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items()))
        raise WorkerFailedError(f"save of step {step} failed, nothing was committed ({detail})", failed)
    if "error" in msg:
        raise WorkerFailedError(f"save of step {step} failed, nothing was committed: {msg['error']}")
    return msg


def _coordinate(t: Transport, what: str, make: Callable[[], Msg]) -> Msg:
    """``make()`` on the coordinator, broadcast; its failure is broadcast as an ``error``."""
    msg: Msg | None = None
    if t.coordinator:
        try:
            msg = make()
        except Exception as err:
            if t.rank is None:
                raise
            msg = {"error": f"{what}: {failure_text(err)}"}
    return t.broadcast(msg)


def _plan(described: Mapping[int, Msg] | None) -> Msg:
    assert described is not None  # the coordinator's gather
    return _failed(described) or {"plan": plan_wire(saver.holders([described[r]["ok"] for r in sorted(described)]))}


def coordinated_save(
    t: Transport,
    root: str,
    *,
    step: int,
    plain_tensors: PlainMode = "auto",
    options: SaveOptions | None = None,
    user_metadata: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Manifest | None:
    """Run the protocol as one party of ``t``; every party calls it. Returns the manifest on the
    coordinator (None elsewhere) once the step is committed, or raises on every party."""

    def begin() -> Msg:
        a = saver.begin(root, step=step, world_size=t.world_size, options=options,
                        user_metadata=user_metadata, storage_options=storage_options)  # fmt: skip
        return {"attempt": attempt_wire(a)}

    attempt = settle(_coordinate(t, "could not start", begin), step)["attempt"]
    plan: Any = plain_tensors
    if plain_tensors == "auto":  # who holds which plain tensor: one small exchange
        described = t.gather("describe", {})
        plan = settle(_coordinate(t, "who holds which plain tensor", lambda: _plan(described)), step)["plan"]
    replies = t.gather("write", {"attempt": attempt, "plan": plan})
    manifest: list[Manifest | None] = [None]

    def commit() -> Msg:
        assert replies is not None  # the coordinator's gather
        msg, manifest[0] = close(attempt_from(attempt), replies, storage_options, raise_errors=t.rank is None)
        return msg

    settle(_coordinate(t, "commit", commit), step)
    return manifest[0]
