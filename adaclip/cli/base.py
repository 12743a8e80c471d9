"""The Typer app, its global options, the `command` decorator every command uses (error policy, lazy
heavy imports, option groups) and the entry point."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import typer

from .._version import __version__
from ..errors import AdaclipError, use_cli_names
from ..ui import log
from .options import group_parameters

app = typer.Typer(
    name="adaclip",
    help=(
        "Adapt a pretrained CLIP model to your own images.\n\n"
        "Typical use: adaclip fit ./images --method adaring -o pets.adaclip, then "
        "adaclip predict pets.adaclip photo.jpg, or adaclip eval pets.adaclip ./images/test."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width (no mid-sentence breaks)
    context_settings={"help_option_names": ["-h", "--help"]},
)

_GLOBAL_FLAGS = ("--debug", "--quiet", "-q", "--verbose", "-v")
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the adaclip version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors (accepted anywhere on the line)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail on stderr."),
) -> None:
    _state["debug"] = debug or bool(os.environ.get("ADACLIP_DEBUG"))
    use_cli_names()
    log.configure(quiet=quiet, verbose=verbose)
    if quiet:
        from ..ui import set_progress

        set_progress(False)


def command(*args: Any, heavy: bool | Callable[[dict[str, Any]], bool] = True, **kwargs: Any):
    """`app.command` plus adaclip's error policy: an AdaclipError becomes one line on stderr and its
    exit code; anything unexpected becomes one line and exit 1; --debug re-raises for the traceback.

    A `heavy` command (or one whose options make `heavy(options)` true) imports torch, torchvision and
    open_clip before its body, while Ctrl-C still ends the process at once (see adaclip._interrupt);
    from its body on, Ctrl-C raises KeyboardInterrupt. A parameter annotated with an option group
    (adaclip.cli.options) is shown as the group's options and arrives as one object."""

    def decorate(function):
        signature, groups = group_parameters(function)

        @functools.wraps(function)
        def run(*fargs: Any, **fkwargs: Any):
            from .._interrupt import import_heavy_modules, interrupts_raise

            if heavy(fkwargs) if callable(heavy) else heavy:
                import_heavy_modules()
            interrupts_raise()
            for name, group in groups.items():
                fkwargs[name] = group.take(fkwargs)
            try:
                return function(*fargs, **fkwargs)
            except AdaclipError as exc:
                if _state["debug"]:
                    traceback.print_exc()
                log.error(exc.one_line())
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                log.error("interrupted")
                raise typer.Exit(130) from None
            except BrokenPipeError:
                # The reader went away (`| head`): stop quietly with 0, as shell tools do. Click would
                # turn it into exit 1; later writes (and the flush at exit) go to /dev/null.
                _silence_stdout()
                raise typer.Exit(0) from None
            except (typer.Exit, typer.Abort):
                raise
            except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
                if _state["debug"]:
                    raise
                first = (str(exc).strip().splitlines() or [""])[0]
                log.error(f"unexpected {type(exc).__name__}: {first} (rerun with --debug for the traceback)")
                raise typer.Exit(1) from None

        run.__signature__ = signature  # type: ignore[attr-defined]  # what typer reads: groups expanded
        run.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return app.command(*args, **kwargs)(run)

    return decorate


# ------------------------------------------------------------------------------------------ entry


def _hoist_global_flags(argv: list[str]) -> list[str]:
    """Accept --debug/--quiet/--verbose anywhere (before `--`) by moving them before the command."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in _GLOBAL_FLAGS]
    rest = [a for a in argv[:end] if a not in _GLOBAL_FLAGS]
    return flags + rest + argv[end:]


def _join_seed_values(argv: list[str]) -> list[str]:
    """`--seeds 1 2 3` (as the research scripts take it) -> `--seeds 1,2,3` (one option value)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] == "--seeds":
            values = []
            while i + 1 < len(argv) and argv[i + 1].lstrip("-").replace(",", "").isdigit():
                values.append(argv[i + 1])
                i += 1
            if values:
                out.append(",".join(values))
        elif argv[i] == "--":
            out.extend(argv[i + 1 :])
            break
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    from .._interrupt import exit_130_until_started, forget_caught_interrupt

    exit_130_until_started()  # until a command's body starts (see `command`)
    argv = _join_seed_values(_hoist_global_flags(list(sys.argv[1:] if argv is None else argv)))
    try:
        app(args=argv, prog_name="adaclip")
    except KeyboardInterrupt:  # outside a command's own handling (writing its output): still one line
        log.error("interrupted")
        sys.exit(130)
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(0)
    finally:
        forget_caught_interrupt()  # every way out is an exit code, never CPython's death by SIGINT


def _silence_stdout() -> None:
    """After the reader of stdout went away: further writes go to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test runner's buffer)
        pass
