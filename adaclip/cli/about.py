"""The commands that describe: `info` (an adapter file or a method), `methods`, `version`."""

from __future__ import annotations

from pathlib import Path

import typer

from .._version import __version__
from ..defaults import DEFAULT_BACKBONE
from ..errors import UsageError
from .base import command
from .options import SUMMARY_FORMATS, BackboneOpt, check_format, complete_method, format_option, parse_settings


@command(heavy=lambda options: options.get("adapter_path") is None)  # `info FILE` needs no torch
def info(
    adapter_path: Path | None = typer.Argument(None, metavar="[ADAPTER]", help="An .adaclip file to describe."),
    method: str | None = typer.Option(
        None,
        "--method",
        "-m",
        help="Without ADAPTER: describe this method on a backbone.",
        autocompletion=complete_method,
    ),
    backbone: str | None = BackboneOpt,
    pretrained: str = typer.Option(
        "none", "--pretrained", "-p", help="Without ADAPTER: weights (parameter counts need none)."
    ),
    num_classes: int = typer.Option(10, "--num-classes", help="Without ADAPTER: classes for class-dependent heads."),
    settings: list[str] = typer.Option([], "--set", help="Without ADAPTER: method setting key=value."),
    fmt: str = format_option("table", SUMMARY_FORMATS),
    device: str = typer.Option("cpu", "--device", help="Device for building the method (cpu is enough)."),
) -> None:
    """Describe an adapter file, or a method's trainable parameters on a backbone.

    Examples:

        adaclip info pets.adaclip

        adaclip info --method adaring --backbone ViT-B-16 --pretrained none --format json
    """
    from ..describe import describe_adapter_file, describe_method
    from ..views import write_summary

    check_format(fmt, SUMMARY_FORMATS)
    if adapter_path is not None:
        document = describe_adapter_file(adapter_path)
    elif method is not None:
        document = describe_method(
            method, backbone or DEFAULT_BACKBONE, pretrained, num_classes, parse_settings(settings), device
        )
    else:
        raise UsageError("give an adapter file, or --method NAME to describe a method", fix="adaclip info --help")
    write_summary(document, fmt, "adaclip info", nested=True)


@command(heavy=False)
def methods(fmt: str = format_option("table", SUMMARY_FORMATS)) -> None:
    """List the available methods."""
    from ..method_catalog import builtin_methods
    from ..views import write_methods

    check_format(fmt, SUMMARY_FORMATS)
    write_methods(builtin_methods(), fmt)


@command(heavy=False)
def version() -> None:
    """Print the adaclip version."""
    typer.echo(__version__)
