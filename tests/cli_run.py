"""The `adaclip` command in a child process, as a user's shell runs it: the one way for tests that need a
real process (exit codes, signals, pipes, what start-up imports). In-process calls use Typer's CliRunner.

Children get no progress bars and one thread (ADACLIP_NO_PROGRESS, OMP_NUM_THREADS), on top of this
process's environment and `env`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

ADACLIP = ("-m", "adaclip")  # `python -m adaclip`, what `torchrun -m adaclip` runs too


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "ADACLIP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **extra}


def cli_command(*args: object, entry: Sequence[str] = ADACLIP) -> list[str]:
    """The child's argv: this interpreter, the entry (`-m adaclip`, or `-c SCRIPT`), then `args`."""
    return [sys.executable, *entry, *map(str, args)]


def run_cli(
    *args: object, env: dict[str, str] | None = None, timeout: float = 120, entry: Sequence[str] = ADACLIP, **kwargs
) -> subprocess.CompletedProcess:
    """`adaclip ARGS...` run to its end; stdout and stderr captured as text."""
    return subprocess.run(
        cli_command(*args, entry=entry),
        capture_output=True,
        text=True,
        env=cli_env(**(env or {})),
        timeout=timeout,
        **kwargs,
    )


def start_cli(*args: object, env: dict[str, str] | None = None, entry: Sequence[str] = ADACLIP, **kwargs):
    """`adaclip ARGS...` started, not waited for (`subprocess.Popen` keywords pass through). The child
    starts with SIGINT at its default, as under a terminal's Ctrl-C: a test run started in the background
    (`make test &`, nohup) would otherwise pass SIGINT on ignored, and Ctrl-C tests would hang."""
    return subprocess.Popen(
        cli_command(*args, entry=entry),
        env=cli_env(**(env or {})),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kwargs,
    )
