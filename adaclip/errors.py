"""Errors that reach the user as one line.

Every error adaclip raises on purpose is an :class:`AdaclipError`. The CLI prints its message on one
line (no traceback unless ``--debug``) and exits with its ``exit_code``: 2 for bad usage or bad input
(the user can fix it), 1 for runtime failures (the environment or adaclip itself).
"""

from __future__ import annotations

from pathlib import Path


class AdaclipError(Exception):
    """Base class: a failure with a message fit for the user."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """`message: path (fix)`, with whatever parts exist, and no newlines."""
        text = self.message
        if self.path:
            text = f"{text}: {self.path}"
        if self.fix:
            text = f"{text} ({self.fix})"
        return " ".join(text.split())


class UsageError(AdaclipError):
    """The command or call was used wrongly (bad option value, missing argument)."""

    exit_code = 2


class InputError(UsageError):
    """The data the user pointed at cannot be used (empty folder, bad class file, ...)."""


class AdapterFileError(InputError):
    """An adapter file is missing, truncated, tampered with, or does not fit this backbone."""


class BackboneUnavailableError(AdaclipError):
    """Backbone weights cannot be had (not cached and no network, unknown tag, ...)."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (at most 300 characters), to quote inside a one-line error."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class UnreadableImageError(Exception):
    """One image could not be decoded. Not user-facing on its own: callers skip and count it.

    `kind`: "not_image" (no known image format), "too_large" (over the pixel limit) or "corrupt"
    (a known format that fails to decode, e.g. truncated); the server maps them to HTTP statuses."""

    def __init__(self, path: str | Path, reason: str, *, kind: str = "corrupt"):
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{path}: {reason}")


# Fixes name the option the user can change: `--pretrained` on the command line, `pretrained=` in Python.
_surface = {"cli": False}


def use_cli_names() -> None:
    """Called by the CLI: from now on, fixes name command-line options."""
    _surface["cli"] = True


def arg(name: str, value: str | None = None) -> str:
    """`arg("pretrained", "none")` -> "--pretrained none" (CLI) or "pretrained='none'" (Python API)."""
    if _surface["cli"]:
        flag = "--" + name.replace("_", "-")
        return f"{flag} {value}" if value is not None else flag
    return f"{name}={value!r}" if value is not None else f"{name}="
