"""Ctrl-C while the `adaclip` command starts: exit 130 with one line, never a traceback.

Importing torch and open_clip takes seconds, and a KeyboardInterrupt raised inside those imports can
escape before any command catches it, or be swallowed by them (see `import_heavy_modules`). So the
command (adaclip.__main__) installs, before any import of its own, a handler that ends the process at
once; it stays through option parsing and the heavy imports, which happen before a command's body
creates anything.
From the body on, Ctrl-C raises KeyboardInterrupt, which the command turns into its own message (e.g.
how to resume a fit) and exit 130. Standard library only.
"""

from __future__ import annotations

import os
import signal


def _exit_130(signum, frame) -> None:
    try:
        os.write(2, b"error: interrupted\n")
    finally:
        os._exit(130)  # nothing is written yet; an import half done has nothing to clean up


def exit_130_until_started() -> None:
    """Ctrl-C ends the process with exit 130 until `interrupts_raise()`; an ignored SIGINT (nohup,
    a background job) stays ignored."""
    try:
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, _exit_130)
    except ValueError:  # not the main thread: leave signals to the program
        pass


def interrupts_raise() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt (what the commands catch)."""
    try:
        if signal.getsignal(signal.SIGINT) is _exit_130:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:
        pass


HEAVY_MODULES = ("torch", "torchvision", "open_clip")


def import_heavy_modules() -> None:
    """Import torch, torchvision and open_clip, which most commands need, while Ctrl-C still ends the
    process at once. A KeyboardInterrupt raised inside these imports is not safe to rely on: torch
    imports numpy from C++ and, if that import fails, clears the error and goes on without numpy, so a
    Ctrl-C landing there would be swallowed and the command would carry on (seen in `fit`)."""
    import importlib

    for name in HEAVY_MODULES:
        importlib.import_module(name)


def forget_caught_interrupt() -> None:
    """Keep a KeyboardInterrupt that adaclip caught from turning exit 130 into death by SIGINT.

    CPython notes a KeyboardInterrupt that escapes code run by exec()/eval() of a *string* as "unhandled"
    (meant for the program's own top level) and, when the program was started with `python -m`, ends the
    process by re-raising SIGINT after it exits, even though the exception was caught and the program
    exited 130. Imports run such strings (dataclasses and namedtuples build their methods that way), so
    a Ctrl-C that lands inside `import torch` can set the note. Running any string through exec()
    clears it (CPython resets the note before each such run).
    """
    exec("pass")
