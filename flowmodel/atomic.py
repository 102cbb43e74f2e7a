"""Atomic file writes: a leaf module every layer may use (no flowmodel imports).

:func:`atomic_path` yields a temporary path beside the destination and renames
it into place only when the block succeeds, so a reader never sees a
half-written file and an interrupted run leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` when the block succeeds.

    Parameters
    ----------
    path
        Final destination (file or directory, e.g. a Zarr store).
    suffix
        Suffix of the temporary name; defaults to the suffix of ``path`` so
        that drivers choosing a format by extension (GDAL, NetCDF) still work.

    Yields
    ------
    pathlib.Path
        Where to write. On an exception it is removed and ``path`` is left as
        it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = target.suffix if suffix is None else suffix
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.stem}.", suffix=f".tmp{suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # writers create it themselves (some refuse to overwrite)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic write of {target} produced no file at {tmp}")
        if target.is_dir() and not tmp.is_dir():
            shutil.rmtree(target)
        if tmp.is_dir() and target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
