"""Progress reporting shared by every long loop: bars where someone watches, heartbeats in logs.

One helper, :func:`progress_bar`, decides how a loop of known length reports
progress:

- in a terminal or a Jupyter notebook: a :mod:`tqdm.auto` bar (a widget in
  notebooks, text in terminals);
- in a non-interactive log (a SLURM job's output file, a CI log, a pipe): one
  plain line every :data:`HEARTBEAT_SECONDS` seconds (``[flowmodel] totals:
  12/50 blocks (24%), 1m00s elapsed, ~3m10s left``) and one when the loop
  ends, if it ran longer than a heartbeat; a bar redrawn with carriage returns
  would fill such a file with noise;
- nothing at all when progress is switched off: ``enabled=False``, or
  :func:`set_progress` ``(False)`` (the command line's ``-q`` does this), or
  the environment variable ``FLOWMODEL_PROGRESS=0``.

Loops take a ``progress`` argument: None (the default) follows the global
setting, which is *on*; True or False force it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

__all__ = [
    "HEARTBEAT_SECONDS",
    "Heartbeat",
    "announce",
    "progress_bar",
    "progress_enabled",
    "set_progress",
]

#: Seconds between two heartbeat lines in non-interactive logs.
HEARTBEAT_SECONDS = 60.0

_STATE: dict[str, bool | None] = {"enabled": None}


def set_progress(enabled: bool | None) -> None:
    """Switch progress reporting on or off for the whole process.

    Parameters
    ----------
    enabled
        True or False; None restores the default (on, unless the environment
        variable ``FLOWMODEL_PROGRESS`` is ``0``, ``false`` or ``no``).
    """
    _STATE["enabled"] = enabled


def progress_enabled(progress: bool | None = None) -> bool:
    """Return whether a loop given ``progress`` reports progress.

    An explicit True/False wins; None follows :func:`set_progress`, then the
    environment variable ``FLOWMODEL_PROGRESS``, then the default (on).
    """
    if progress is not None:
        return bool(progress)
    if _STATE["enabled"] is not None:
        return bool(_STATE["enabled"])
    env = os.environ.get("FLOWMODEL_PROGRESS", "").strip().lower()
    return env not in ("0", "false", "no", "off")


def _in_notebook() -> bool:
    """Return True inside a Jupyter kernel (where tqdm.auto draws a widget)."""
    if "IPython" not in sys.modules:
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except Exception:  # pragma: no cover - broken IPython install
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _interactive(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return _in_notebook() or bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Heartbeat:
    """Progress for non-interactive logs: one line per ``interval`` seconds, no redrawing.

    Has the part of tqdm's interface the loops use: ``update(n)``, ``close()``,
    iteration and use as a context manager.

    Parameters
    ----------
    iterable
        Optional iterable to wrap.
    total
        Number of steps (``len(iterable)`` when omitted and available).
    desc
        What is running (``"prediction"``, ``"totals"``, ...).
    unit
        Name of one step (``"block"``, ``"fold"``, ...).
    interval
        Seconds between lines (default :data:`HEARTBEAT_SECONDS`).
    file
        Where lines go (default ``sys.stderr``, where a bar would be drawn).
    clock
        Time source (tests pass a fake one).
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        interval: float | None = None,
        file: TextIO | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc = desc
        self.unit = unit
        self.interval = HEARTBEAT_SECONDS if interval is None else float(interval)
        self.file = file
        self.clock = clock
        self.n = 0
        self.start = clock()
        self.last = self.start
        self.lines = 0
        self.closed = False

    def _line(self, final: bool = False) -> str:
        elapsed = self.clock() - self.start
        units = self.unit + ("" if self.unit.endswith("s") else "s")
        if self.total:
            share = self.n / self.total
            text = f"{self.n}/{self.total} {units} ({share:.0%}), {_duration(elapsed)} elapsed"
            if not final and 0 < self.n < self.total:
                text += f", ~{_duration(elapsed / self.n * (self.total - self.n))} left"
        else:
            text = f"{self.n} {units}, {_duration(elapsed)} elapsed"
        if final:
            text += ", done"
        return f"[flowmodel] {self.desc}: {text}" if self.desc else f"[flowmodel] {text}"

    def _emit(self, final: bool = False) -> None:
        out = self.file if self.file is not None else sys.stderr
        print(self._line(final), file=out, flush=True)
        self.lines += 1

    def update(self, n: int = 1) -> None:
        """Record ``n`` more steps; print a line when a heartbeat interval has passed."""
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._emit()

    def close(self) -> None:
        """Print a closing line if the loop ran longer than one heartbeat."""
        if self.closed:
            return
        self.closed = True
        if self.clock() - self.start >= self.interval:
            self._emit(final=True)

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("Heartbeat was created without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Silent(Heartbeat):
    def _emit(self, final: bool = False) -> None:
        return None


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    progress: bool | None = None,
    file: TextIO | None = None,
    interval: float | None = None,
) -> Any:
    """Return a progress reporter for a loop: a tqdm bar, a :class:`Heartbeat`, or nothing.

    Parameters
    ----------
    iterable
        Iterable to wrap (or use ``update()`` on the result).
    total
        Number of steps.
    desc, unit
        Label of the loop and of one step.
    progress
        True/False to force; None follows :func:`progress_enabled`.
    file
        Stream (default ``sys.stderr``); a terminal or a notebook get a bar,
        anything else heartbeat lines.
    interval
        Seconds between heartbeat lines (default :data:`HEARTBEAT_SECONDS`).

    Returns
    -------
    tqdm.auto.tqdm or Heartbeat
        Both support ``update(n)``, ``close()``, iteration and ``with``.
    """
    if not progress_enabled(progress):
        return _Silent(iterable, total=total, desc=desc, unit=unit, interval=float("inf"))
    stream = file if file is not None else sys.stderr
    if _interactive(stream):
        from tqdm.auto import tqdm

        return tqdm(
            iterable, total=total, desc=desc, unit=unit, file=file, disable=False, leave=False
        )
    return Heartbeat(iterable, total=total, desc=desc, unit=unit, interval=interval, file=file)


def announce(message: str, *, progress: bool | None = None, file: TextIO | None = None) -> None:
    """Print one line ``[flowmodel] message`` where progress goes, unless progress is off.

    For a long step that reports no progress of its own (compiling a model before
    sampling): said once, before it starts, in a terminal and in a log alike.

    Parameters
    ----------
    message
        What is about to happen, and about how long it takes.
    progress
        True/False to force; None follows :func:`progress_enabled`.
    file
        Stream (default ``sys.stderr``).
    """
    if progress_enabled(progress):
        stream = file if file is not None else sys.stderr
        print(f"[flowmodel] {message}", file=stream, flush=True)
