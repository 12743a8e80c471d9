"""Everything adaclip says to a person goes to stderr through here; stdout is reserved for results.

adaclip logs through the standard `logging` module, under the logger named "adaclip", so library users
silence or redirect it like any library: `logging.getLogger("adaclip").setLevel(logging.ERROR)`
silences it; replacing its handlers redirects it, and `logger.handlers.clear(); logger.propagate = True`
hands its records to the application's own logging configuration. Like Hugging Face libraries, it has
a default handler and does not propagate, so a script that configured nothing still sees adaclip's
messages, once. That handler writes to stderr: rich's `RichHandler` on a terminal, one plain line per
message elsewhere (pipes, CI logs). `log` is the small facade the code calls (info, detail =
debug, warning, error). `progress()` is a rich progress bar, drawn only on a terminal, not when quiet,
and not after `set_progress(False)` (or with ADACLIP_NO_PROGRESS set).
"""

from __future__ import annotations

import contextlib
import logging
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
logger = logging.getLogger("adaclip")
logger.setLevel(logging.INFO)  # adaclip's messages are on by default, as a command-line tool's are

_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}
_STYLE = {logging.DEBUG: "dim", logging.WARNING: "yellow", logging.ERROR: "bold red", logging.CRITICAL: "bold red"}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Messages name user files: control characters in them are escaped (see output.printable).
        return _PREFIX.get(record.levelno, "") + printable(record.getMessage(), keep_newlines=True)


class StderrHandler(logging.Handler):
    """adaclip's default handler: stderr as it is when a record is written (so redirected or captured
    stderr works), through rich's handler on a terminal."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_Formatter())
        self._rich = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if stderr_console.is_terminal:
                if self._rich is None:
                    from rich.logging import RichHandler

                    self._rich = RichHandler(
                        console=stderr_console, show_time=False, show_path=False, show_level=False, markup=False
                    )
                    self._rich.setFormatter(self.formatter)
                self._rich.emit(record)
            else:
                stderr_console.print(self.format(record), markup=False, style=_STYLE.get(record.levelno))
        except Exception:  # noqa: BLE001 - logging must never break the program
            self.handleError(record)


logger.addHandler(StderrHandler())
logger.propagate = False


class Log:
    """The messages adaclip's code writes, as records of the "adaclip" logger."""

    def configure(self, *, quiet: bool = False, verbose: bool = False) -> None:
        """The CLI's -q / -v: errors only, or debug detail too."""
        logger.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)

    @property
    def level(self) -> int:
        """0 quiet (errors only), 1 normal, 2 verbose."""
        return 2 if logger.isEnabledFor(logging.DEBUG) else 1 if logger.isEnabledFor(logging.WARNING) else 0

    def info(self, message: str) -> None:
        logger.info(message)

    def detail(self, message: str) -> None:
        logger.debug(message)

    def warning(self, message: str) -> None:
        logger.warning(message)

    def error(self, message: str) -> None:
        logger.error(message)

    @contextlib.contextmanager
    def warnings_as_detail(self) -> Iterator[None]:
        """Within the block, warnings become debug detail: for re-building what a user was already warned
        about (loading an adapter repeats the checks its fit made)."""
        demote = _Demote()
        logger.addFilter(demote)
        try:
            yield
        finally:
            logger.removeFilter(demote)


class _Demote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logger.isEnabledFor(logging.DEBUG)
        return True


log = Log()
_progress = {"enabled": True}


def set_progress(enabled: bool) -> None:
    """Turn adaclip's progress bars on or off for this process (library users; the CLI's -q does it too)."""
    _progress["enabled"] = bool(enabled)


def progress_enabled() -> bool:
    return (
        _progress["enabled"]
        and logger.isEnabledFor(logging.INFO)
        and stderr_console.is_terminal
        and not os.environ.get("ADACLIP_NO_PROGRESS")
    )


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
