"""``python -m ckpt``: the command line (see :mod:`ckpt.cli`)."""

from __future__ import annotations

from ckpt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
