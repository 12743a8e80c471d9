"""Ctrl-C while the `adaclip` command starts: exit 130 with one line, never a traceback.

Importing torch and open_clip takes seconds, and a KeyboardInterrupt raised inside an import escapes
before any command can catch it. So the command installs, before those imports, a handler that ends
the process at once; once the command runs, Ctrl-C raises KeyboardInterrupt again, which the command
turns into its own message (e.g. how to resume a fit) and exit 130. Standard library only.
"""

from __future__ import annotations

import os
import signal
import sys


def _exit_130(signum, frame) -> None:
    try:
        os.write(2, b"error: interrupted\n")
    finally:
        os._exit(130)  # nothing is written yet; an import half done has nothing to clean up


def started_as_command() -> bool:
    """True in the `adaclip` console script and `python -m adaclip` (also under torchrun), not when a
    program imports the library (its Ctrl-C stays its own)."""
    argv = list(getattr(sys, "orig_argv", []))
    if "-m" in argv:
        index = argv.index("-m")
        return argv[index + 1 : index + 2] == ["adaclip"]
    return os.path.basename(sys.argv[0] if sys.argv else "") == "adaclip"


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
