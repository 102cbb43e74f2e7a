"""Progress on long work: tqdm bars where someone watches, a heartbeat line in batch logs.

A leaf module (no flowmodel imports). :func:`progress` wraps an iterable: in a
terminal or a notebook it shows a ``tqdm.auto`` bar; in a non-interactive run
(SLURM logs, ``nohup``) it logs one line per minute through the
``flowmodel.progress`` logger instead of a bar that would fill the log with
carriage returns. ``enabled=False`` (``-q``) silences both.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

__all__ = ["HEARTBEAT_SECONDS", "interactive", "progress"]

#: Seconds between two heartbeat lines in non-interactive logs.
HEARTBEAT_SECONDS = 60.0

logger = logging.getLogger("flowmodel.progress")


def interactive() -> bool:
    """Whether a person watches: a notebook kernel or a terminal on stderr."""
    if "ipykernel" in sys.modules:
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress[T](
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool | None = None,
    heartbeat: float = HEARTBEAT_SECONDS,
) -> Iterator[T]:
    """Yield from ``iterable`` while showing progress.

    Parameters
    ----------
    iterable
        The work items.
    total
        Number of items (default: ``len(iterable)`` when it has one).
    desc
        What is being done, e.g. ``"predict"``.
    enabled
        True/False to force; None (default): a bar when :func:`interactive`, else
        heartbeat lines.
    heartbeat
        Seconds between heartbeat lines.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if enabled is False:
        yield from iterable
        return
    if enabled or interactive():
        from tqdm.auto import tqdm

        yield from tqdm(iterable, total=total, desc=desc, leave=False)
        return
    start = last = time.monotonic()
    for k, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= heartbeat:
            last = now
            of = f"/{total}" if total else ""
            logger.info("%s: %d%s done after %.0f s", desc or "progress", k, of, now - start)
