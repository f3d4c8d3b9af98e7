"""Progress of long work, with a total and an ETA: a live tqdm bar on a terminal, a line every
``every`` seconds elsewhere (a CI log, a Ray worker's output, a file), never a stream of carriage
returns.

tqdm does both: off a terminal its bar text goes through :class:`_Lines`, which turns each
redraw into one line, and ``mininterval`` spaces the redraws. ``HFEDIT_PROGRESS=0`` turns every
bar off; ``HFEDIT_PROGRESS_EVERY`` sets the seconds between lines off a terminal.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Iterable, Optional


class _Lines:
    """A text stream for tqdm that writes each redraw as one line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Optional[Iterable] = None, total: Optional[float] = None, desc: str = "",
             unit: str = "it", initial: float = 0, every: Optional[float] = None,
             stream: Optional[IO[str]] = None, disable: bool = False):
    """A tqdm bar over ``iterable`` (or to ``total`` with ``update()``): on a terminal it redraws
    in place; otherwise it prints one line per ``every`` seconds (default 30, or
    ``$HFEDIT_PROGRESS_EVERY``) and a last line when closed."""
    from tqdm.auto import tqdm

    stream = stream if stream is not None else sys.stderr
    off = disable or os.environ.get("HFEDIT_PROGRESS", "1") == "0"
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream,
                    disable=off, leave=False)
    every = every if every is not None else float(os.environ.get("HFEDIT_PROGRESS_EVERY", 30))
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=_Lines(stream),
                disable=off, mininterval=every, maxinterval=max(every, 10.0), ncols=100,
                ascii=True)


__all__ = ["progress"]
