"""The `adaclip` command: the console script, `python -m adaclip` and `torchrun -m adaclip` all start here."""

from ._interrupt import exit_130_until_started


def main() -> None:
    """Ctrl-C's exit-130 handler goes in before the CLI's own imports (typer, rich); see adaclip._interrupt."""
    exit_130_until_started()
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
