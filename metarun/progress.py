"""Progress bars for long work (decoding, downloads, training, evaluation)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def columns(*extra) -> tuple:
    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )


@contextmanager
def progress_bar(total: int, description: str, transient: bool = False, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``; draws nothing when stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    with Progress(*columns(), console=console, transient=transient) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
