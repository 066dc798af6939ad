"""``ckpt rm`` and ``ckpt gc``: the commands that delete."""

from __future__ import annotations

import argparse
from typing import Any

from ckpt.cli._common import EXIT_OK, count, open_root, print_json
from ckpt.lifecycle import cleanup
from ckpt.units import human_size


def cmd_rm(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    storage = open_root(args.root, opts)
    done = cleanup.retire_steps(storage, args.steps, dry_run=args.dry_run)  # every step read first
    if args.json:
        retired = [
            {
                "step": r.step,
                "files_deleted": list(r.files_deleted),
                "files_kept": list(r.files_kept),
            }
            for r in done
        ]
        print_json({"root": storage.url, "dry_run": args.dry_run, "retired": retired})
        return EXIT_OK
    verb, deleted = ("would retire", "would delete") if args.dry_run else ("retired", "deleted")
    for r in done:
        kept = ""
        if r.files_kept:
            kept = f"; kept {count(len(r.files_kept), 'file')} another checkpoint references"
        print(f"{verb} step {r.step}: {deleted} {count(len(r.files_deleted), 'data file')}{kept}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    storage = open_root(args.root, opts)
    plan = cleanup.collect_garbage(storage, grace_s=args.grace_hours * 3600.0, dry_run=args.dry_run)
    if args.json:
        doc = {
            "root": storage.url,
            "dry_run": args.dry_run,
            "deleted": list(plan.delete),
            "deleted_bytes": plan.delete_bytes,
            "aborted_uploads": [u.key for u in plan.abort],
            "too_recent": list(plan.too_recent),
            "blocked_by": list(plan.blocked_by),
        }
        print_json(doc)
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    line = f"{verb} {count(len(plan.delete), 'file')} ({human_size(plan.delete_bytes)})"
    if plan.abort:
        aborted = "would abort" if args.dry_run else "aborted"
        line += f", {aborted} {count(len(plan.abort), 'stale upload')}"
    print(line)
    if plan.too_recent:
        print(
            f"kept {count(len(plan.too_recent), 'unreferenced file')} younger than "
            f"{args.grace_hours:g} h (a save may still be writing them)"
        )
    for m in plan.blocked_by:
        print(f"collected no data: {m} does not validate, so what it references is unknown")
    return EXIT_OK
