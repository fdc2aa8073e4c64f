"""Progress bars with rate and ETA (rich), quiet when disabled or not on a terminal."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

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
    """One shared console; ``task(name, total)`` yields an ``advance(n)`` callable."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal

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
