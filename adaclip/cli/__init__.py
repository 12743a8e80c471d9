"""The `adaclip` command: a thin Typer layer over the library.

Each command parses options, calls the Python API, and hands the result to one view (adaclip.views),
which writes it to stdout in the chosen format. Errors become one line on stderr and an exit code (0 ok,
1 runtime failure, 2 bad usage or input); `--debug` (anywhere on the command line) shows the traceback
instead.

Layout: `base` (the app, the `command` decorator, the entry point), `options` (options shared by
several commands, as option groups), and one module per family of commands: `train` (fit, compare),
`predict` (predict, tta), `evaluate` (eval, report), `export`, `serve`, `about` (info, methods,
version). Importing them registers their commands; `adaclip --help` lists them in `COMMANDS` order.
"""

from __future__ import annotations

from . import about, evaluate, export, predict, serve, train  # noqa: F401 - importing registers the commands
from .base import _join_seed_values, app, main
from .serve import serve_plan

COMMANDS = ("fit", "predict", "eval", "tta", "compare", "report", "info", "export", "serve", "methods", "version")
app.registered_commands.sort(key=lambda info: COMMANDS.index(info.name or info.callback.__name__))

__all__ = ["COMMANDS", "_join_seed_values", "app", "main", "serve_plan"]
