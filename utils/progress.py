"""Progress bars for the waits outside Lightning's loop (sampling, token-cache encoding, Inception features)."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable=None, desc: str = "", total: int | None = None, unit: str = "batch"):
    """A tqdm bar on stderr (rank 0 only; TOKAR_PROGRESS=0 turns them off), shown even when stderr is a file."""
    rank = int(os.environ.get("RANK", 0))
    off = rank != 0 or os.environ.get("TOKAR_PROGRESS", "1") == "0"
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=off, file=sys.stderr, dynamic_ncols=True,
                leave=False, mininterval=0.5)
