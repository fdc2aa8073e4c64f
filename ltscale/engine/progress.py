"""Progress: bars with rate and ETA (rich) on a terminal; plain timestamped lines elsewhere (a
SLURM job's log file, a pipe), so a run hours long is not silent until its final table."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress


class Progress:
    """One shared console; ``task(name, total)`` yields an ``advance(n)`` callable, and
    :meth:`note` reports a milestone (a stage started or finished, an epoch's metrics).

    On a terminal the bars run and notes print above them; off a terminal there are no bars and
    each note is one line on ``stream`` (stderr), flushed at once. ``enabled=False`` (the
    pipeline's ``progress=false``) silences both. A ``console`` passed in decides for itself.

    Without one, stderr must really be a tty for bars: rich's ``Console.is_terminal`` alone
    follows FORCE_COLOR / TTY_COMPATIBLE, which sbatch passes on from the submitter's shell, and a
    SLURM log file then got bar redraws and not one epoch line.
    """

    def __init__(self, enabled: bool = True, console: Console | None = None, stream: TextIO | None = None) -> None:
        if console is None:
            # On a tty rich still decides (TTY_COMPATIBLE=0 there asks for no bars); off one, no
            # variable brings the bars back.
            console = Console(stderr=True, force_terminal=None if _stderr_is_a_tty() else False)
        self.console = console
        self.enabled = enabled and self.console.is_terminal  # the bars
        self.lines = enabled and not self.console.is_terminal
        self.stream = stream

    def note(self, message: str, *, epoch: bool = False) -> None:
        """``epoch``: a per-epoch line, shown off a terminal only (a bar already shows it there)."""
        if self.enabled and not epoch:
            self.console.print(message, highlight=False, markup=False)
        elif self.lines:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def task(self, name: str, total: int, unit: str = "it") -> Iterator[Callable[[int], None]]:
        if not self.enabled:
            yield lambda n=1: None
            return
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("[cyan]{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with _RichProgress(*columns, console=self.console, transient=True) as bar:
            handle = bar.add_task(name, total=total, rate="")

            def advance(n: int = 1) -> None:
                bar.advance(handle, n)
                speed = bar.tasks[0].speed
                if speed:
                    bar.update(handle, rate=f"{speed:.1f} {unit}/s")

            yield advance


def _stderr_is_a_tty() -> bool:
    try:
        return os.isatty(sys.stderr.fileno())
    except (AttributeError, ValueError, OSError):  # replaced by an object without a descriptor, or closed
        return False
