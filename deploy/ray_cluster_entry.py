"""Run ``examples/ray_demo.py`` as the driver of an existing Ray cluster.

    python deploy/ray_cluster_entry.py --root s3://BUCKET/ckpt/ray-demo [--endpoint-url URL]

The example is written for ``make demo``: it calls ``ray.init(num_cpus=4,
object_store_memory=...)``, which starts a private single-node Ray instance and which Ray
refuses ("When connecting to an existing cluster, num_cpus and num_gpus must not be
provided") wherever a cluster is already running: a KubeRay ``RayJob`` driver, ``ray job
submit``, ``ray exec`` on a cluster launcher head. This wrapper runs the example unchanged,
with ``ray.init`` connecting to the running cluster (``address="auto"``: ``RAY_ADDRESS`` or
the cluster on this node) and dropping the arguments that only size a new local instance.
Every other argument goes to the example as is (its flags: ``--root``, ``--endpoint-url``).

On a cluster the checkpoint root must be storage every node reaches (``s3://...``): the
example's default, a temporary directory on the driver's node, is refused here.
Nothing in the ``ckpt`` package imports this file.
"""

from __future__ import annotations

import functools
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ray_demo.py"

# ray.init arguments that only size a new local instance; Ray raises if they are given when
# connecting to a running cluster
LOCAL_ONLY = (
    "num_cpus",
    "num_gpus",
    "resources",
    "labels",
    "object_store_memory",
    "_system_config",
)


def connect_only(init: Callable[..., Any]) -> Callable[..., Any]:
    """``init`` (``ray.init``) made to join the running cluster instead of starting one."""

    @functools.wraps(init)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for k in LOCAL_ONLY:
            kwargs.pop(k, None)
        if not args:
            kwargs.setdefault("address", "auto")
        return init(*args, **kwargs)

    return wrapper


def _root(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--root" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--root="):
            return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    wants_help = any(a in ("-h", "--help") for a in argv)
    root = _root(argv)
    if not wants_help and (root is None or "://" not in root or root.startswith("file://")):
        raise SystemExit(
            "ray_cluster_entry.py: give --root as shared storage every node reaches "
            "(e.g. --root s3://BUCKET/ckpt/ray-demo); a local directory exists on one node only"
        )
    import ray

    ray.init = connect_only(ray.init)
    sys.argv = [str(EXAMPLE), *argv]
    runpy.run_path(str(EXAMPLE), run_name="__main__")


if __name__ == "__main__":
    main()
