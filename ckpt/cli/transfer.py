"""``ckpt cp``, ``ckpt export``, ``ckpt import`` and ``ckpt adopt``: the commands that move
checkpoints between roots and formats."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ckpt.cli._common import (
    EXIT_OK,
    EXIT_USAGE,
    clean,
    count,
    open_root,
    plural,
    print_json,
    progress_bar,
    split_root_at_step,
)
from ckpt.format.manifest import Manifest
from ckpt.units import human_size, parse_size

T = TypeVar("T")


def cmd_cp(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    from ckpt.lifecycle import copy as copier
    from ckpt.progress import Progress

    src_root, at_step = split_root_at_step(args.src)
    steps = [*(args.step or []), *([] if at_step is None else [at_step])]
    src_opts = {**opts, **dict(args.src_storage_options or [])}
    dst_opts = {**opts, **dict(args.dst_storage_options or [])}
    open_root(src_root, src_opts)  # an unknown protocol or a refused option: exit 4, one line
    open_root(args.dst, dst_opts)
    given = {
        "num_threads": args.threads,
        "chunk_bytes": args.chunk_size,
        "max_inflight_bytes": args.max_inflight,
        "max_bytes_per_s": args.limit_rate,
    }
    options = copier.CopyOptions(
        check_existing=not args.no_check_existing,
        **{k: v for k, v in given.items() if v is not None},
    )
    bars: list[Any] = []  # the progress bar, made once the plan gives the total
    lock = threading.Lock()

    def sized(plan: copier.CopyPlan) -> None:
        total = plan.bytes_to_copy + plan.bytes_to_check
        bars.append(progress_bar(total, "cp", disable=args.quiet))

    def progress(p: Progress) -> None:
        with lock:
            if bars and p.bytes_done > bars[0].n:
                bars[0].update(p.bytes_done - bars[0].n)

    try:
        report = copier.copy(
            src_root,
            args.dst,
            steps or None,
            src_storage_options=src_opts,
            dst_storage_options=dst_opts,
            options=options,
            progress=progress,
            on_plan=sized,
        )
    finally:
        for bar in bars:
            bar.close()
    if args.json:
        print_json(report.to_json())
        return EXIT_OK
    if report.steps_copied:
        done = ", ".join(map(str, report.steps_copied))
        print(
            f"copied step{plural(len(report.steps_copied))} {done} to {report.dst}: "
            f"{count(report.files_copied, 'file')} ({human_size(report.bytes_copied)}) in "
            f"{report.seconds:.2f} s, {report.mb_per_s:.1f} MB/s"
        )
    if report.files_skipped:
        print(f"skipped {count(report.files_skipped, 'file')} already at the destination")
    if report.files_replaced:
        print(f"replaced {count(report.files_replaced, 'incomplete file')} at the destination")
    if report.steps_present:
        present = ", ".join(map(str, report.steps_present))
        print(
            "already at the destination (identical manifest): "
            f"step{plural(len(report.steps_present))} {present}"
        )
    return EXIT_OK


def cmd_export(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    dst_opts = {**opts, **dict(args.dst_storage_options or [])}
    open_root(args.root, opts)

    def export(fn: Callable[..., T], **own: Any) -> T:
        """``fn`` (export_zarr or export_hf): ROOT's step to DST, each side with its options."""
        return fn(
            args.root,
            args.dst,
            args.step,
            storage_options=opts,
            dst_storage_options=dst_opts,
            **own,
        )

    fields: dict[str, Any]  # of the JSON document, between "dst" and "seconds"
    if args.format == "zarr":
        from ckpt.interop.zarr import export_zarr

        z = export(export_zarr, level=args.level)
        step, seconds = z.step, z.seconds
        fields = {"num_tensors": z.num_tensors, "tensor_bytes": z.tensor_bytes}
        summary = f"({human_size(z.tensor_bytes)}) in {z.seconds:.2f} s"
    else:
        from ckpt.interop.hf import export_hf

        try:
            limit = parse_size(args.max_shard_size)
        except ValueError as err:
            print(f"ckpt: error: --max-shard-size: {err}", file=sys.stderr)
            return EXIT_USAGE
        h = export(
            export_hf,
            max_shard_bytes=limit,
            prefix=args.prefix,
            strip_prefix=args.strip_prefix,
            rename=args.rename,
            separator=args.separator,
        )
        step, seconds = h.step, h.seconds
        fields = {
            "files": list(h.files),
            "num_tensors": len(h.weight_map),
            "total_size": h.total_size,
            "skipped_objects": list(h.skipped_objects),
        }
        summary = f"({human_size(h.total_size)}) in {count(len(h.files), 'file')}"
        if h.skipped_objects:
            summary += f"; skipped {count(len(h.skipped_objects), 'non-tensor value')}"
    doc = {
        "format": args.format,
        "step": step,
        "dst": args.dst,
        **fields,
        "seconds": round(seconds, 3),
    }
    tensors = count(fields["num_tensors"], "tensor")
    return _report(args, doc, f"exported step {step} to {args.dst}: {tensors} {summary}")


def cmd_import(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    from ckpt.interop.zarr import import_zarr

    src_opts = {**opts, **dict(args.src_storage_options or [])}
    open_root(args.root, opts)
    m = import_zarr(
        args.src, args.root, args.step, src_storage_options=src_opts, storage_options=opts
    )
    summary = f"{count(len(m.tensors), 'tensor')}, {count(len(m.files), 'file')}"
    line = f"imported step {m.step} into {args.root}: {summary} ({human_size(m.total_bytes)})"
    return _committed(args, m, line, num_files=len(m.files))


def cmd_adopt(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    from ckpt.interop.adopt import adopt

    open_root(args.root, opts)
    m = adopt(args.root, step=args.step, storage_options=opts)
    summary = f"{human_size(m.total_bytes)}, {count(len(m.tensors), 'tensor')}"
    line = f"adopted {count(len(m.files), 'file')} ({summary}) under {args.root} as step {m.step}"
    return _committed(args, m, line, files=sorted(m.files))


def _committed(args: argparse.Namespace, m: Manifest, line: str, **more: Any) -> int:
    """What import and adopt say about the step ``m`` they committed under ROOT."""
    doc = {"root": args.root, "step": m.step, "num_tensors": len(m.tensors), **more}
    return _report(args, {**doc, "total_bytes": m.total_bytes}, line)


def _report(args: argparse.Namespace, doc: dict[str, Any], line: str) -> int:
    """What a command that wrote something says: ``doc`` with --json, else ``line``."""
    if args.json:
        print_json(doc)
    else:
        print(clean(line))
    return EXIT_OK
