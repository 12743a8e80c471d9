"""Everything adaclip says to a person goes to stderr through here; stdout is reserved for results.

`log` is a tiny leveled logger over a rich Console on stderr; `progress()` is a rich progress bar that
disappears when stderr is not a terminal or when quiet.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .output import printable

stderr_console = Console(stderr=True, highlight=False, soft_wrap=True)


class Log:
    """Leveled messages on stderr: quiet (errors only), normal, verbose."""

    def __init__(self) -> None:
        self.level = 1  # 0 quiet, 1 normal, 2 verbose

    def configure(self, *, quiet: bool = False, verbose: bool = False) -> None:
        self.level = 0 if quiet else 2 if verbose else 1

    # Messages name user files: control characters in them are escaped (see output.printable).

    def info(self, message: str) -> None:
        if self.level >= 1:
            stderr_console.print(printable(message, keep_newlines=True), markup=False)

    def detail(self, message: str) -> None:
        if self.level >= 2:
            stderr_console.print(printable(message, keep_newlines=True), markup=False, style="dim")

    def warning(self, message: str) -> None:
        if self.level >= 1:
            stderr_console.print(f"warning: {printable(message, keep_newlines=True)}", markup=False, style="yellow")

    def error(self, message: str) -> None:
        stderr_console.print(f"error: {printable(message, keep_newlines=True)}", markup=False, style="bold red")


log = Log()


def progress_enabled() -> bool:
    return log.level >= 1 and stderr_console.is_terminal and not os.environ.get("ADACLIP_NO_PROGRESS")


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[callable]:
    """Yields `advance(n=1, **fields)`; draws a bar on stderr only when it is a terminal."""
    if not progress_enabled():
        yield lambda n=1, **fields: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr_console,
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total, status="")

        def advance(n: int = 1, **fields) -> None:
            status = " ".join(f"{k}={v}" for k, v in fields.items())
            bar.update(task, advance=n, status=status)

        yield advance
