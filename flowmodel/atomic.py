"""Atomic file writes: a leaf module every layer may use (no flowmodel imports).

:func:`atomic_path` yields a temporary path beside the destination and renames
it into place only when the block succeeds, so a reader never sees a
half-written file and an interrupted run leaves the old file as it was.

A process killed inside the block (``kill -9``, a node failure) cannot remove
its temporary file; :func:`clean_stale_temp` removes such leftovers (the run
pipeline calls it when it starts, holding the run lock, so no live writer of
the run can own them).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["atomic_path", "clean_stale_temp", "is_temp_name"]

#: Names :func:`atomic_path` gives its temporary files: ``.<stem>.<8 random>.tmp<suffix>``
#: (the random part is :func:`tempfile.mkstemp`'s).
_TEMP_NAME = re.compile(r"^\.(?P<stem>.+)\.(?P<rand>[a-z0-9_]{8})\.tmp(?P<suffix>\..*)?$")


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
    fd, tmp_name = tempfile.mkstemp(  # named as _TEMP_NAME matches
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


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary name of :func:`atomic_path` (``.<stem>.<random>.tmp<suffix>``)."""
    return _TEMP_NAME.match(name) is not None


def clean_stale_temp(
    folder: str | os.PathLike[str],
    *,
    older_than: float | None = None,
    names: Iterable[str] = (),
) -> list[Path]:
    """Remove the temporary files (and folders) of interrupted atomic writes in ``folder``.

    Only call it where no live process writes: the pipeline calls it holding
    the run lock of the folder.

    Parameters
    ----------
    folder
        Folder to clean (not recursive: :func:`atomic_path` writes beside its target).
    older_than
        Only remove entries last modified before this time (seconds since the
        epoch); None removes every match.
    names
        Targets whose ``.<name>.old`` leftover (a directory replaced by
        :func:`atomic_path`, e.g. a Zarr store, when the process died between
        the two renames) is removed too.

    Returns
    -------
    list of pathlib.Path
        What was removed.
    """
    folder = Path(folder)
    olds = {f".{name}.old" for name in names}
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not (is_temp_name(entry.name) or entry.name in olds):
            continue
        try:
            if older_than is not None and entry.lstat().st_mtime >= older_than:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed
