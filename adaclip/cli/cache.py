"""`adaclip cache info|clear`: the feature cache (adaclip.feature_store) as a user sees it."""

from __future__ import annotations

import typer

from .base import app, command
from .options import SUMMARY_FORMATS, FeatureCacheOpt, check_format, format_option

cache_app = typer.Typer(
    name="cache",
    help="The feature cache: frozen image features kept between runs (`info`, `clear`).",
    no_args_is_help=True,
)
app.add_typer(cache_app)


@command("info", heavy=False, on=cache_app)
def info(feature_cache: str | None = FeatureCacheOpt, fmt: str = format_option("table", SUMMARY_FORMATS)) -> None:
    """Where the feature cache is, and its entries and size per backbone.

    Example: adaclip cache info --format json
    """
    from ..feature_store import cache_info
    from ..views import write_cache_info

    check_format(fmt, SUMMARY_FORMATS)
    write_cache_info(cache_info(feature_cache), fmt)


@command("clear", heavy=False, on=cache_app)
def clear(
    backbone: str | None = typer.Option(
        None, "--backbone", "-b", help="Only this backbone's features (its name, e.g. lite or ViT-B-16)."
    ),
    feature_cache: str | None = FeatureCacheOpt,
    fmt: str = format_option("table", SUMMARY_FORMATS),
) -> None:
    """Remove the cached features (of every backbone, or of one). Weights (--cache-dir) are never touched.

    Example: adaclip cache clear --backbone ViT-B-16
    """
    from ..feature_store import clear_cache
    from ..views import write_cache_cleared

    check_format(fmt, SUMMARY_FORMATS)
    write_cache_cleared(clear_cache(feature_cache, backbone), fmt)
