"""Progress bars for long work (rich) on stderr: samples drawn, sequences scored, optimiser steps.

Each bar is transient (gone when its work ends) and off where the output is not a terminal, or the
caller says so: `kd loop` then prints one line per epoch."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# soft_wrap: a line is one line in a log file or pipe (rich would otherwise wrap it at 80 columns there).
console = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    if not enabled or not console.is_terminal:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
