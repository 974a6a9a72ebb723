"""Atomic file writes: the one place tokar writes a file that must never be seen half-written."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def file_mode() -> int:
    """The mode open() gives a new file under the current umask (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_replace(write, path: str | Path) -> None:
    """Call write(tmp_path) on a temp file beside `path`, fsync it, then rename it over `path`.

    The temp file is `.<name>.<random>.tmp` (what `stale_temp_files` looks for) and gets the mode an ordinary
    new file gets (mkstemp's 0600 would make checkpoints unreadable to the run's group).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stale_temp_files(folder: str | Path) -> list[Path]:
    """Temp files `atomic_replace` left in `folder` when its process was killed mid-write (never a finished file)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file() and p.name.count(".") >= 3)
