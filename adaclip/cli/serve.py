"""`adaclip serve`: adapters over HTTP; its options are also parsed for the ASGI factory
(adaclip.serve.asgi) through `serve_plan`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..errors import UsageError, use_cli_names
from ..ui import log
from .base import app, command
from .options import CacheDirOpt, DeviceOpt, PrecisionOpt


@command()
def serve(
    adapters: list[str] = typer.Argument(
        ..., metavar="ADAPTER...", help="Adapter files to serve: PATH (named by its file name) or NAME=PATH."
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on. The default is this machine only; 0.0.0.0 is everyone."
    ),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port, printed at start)."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="File whose first line is a bearer token every request must send (not /healthz)."
    ),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest request body in MiB (413 past it)."),
    max_images: int = typer.Option(32, "--max-images", help="Images in one request (413 past it)."),
    max_pixels: int = typer.Option(25_000_000, "--max-pixels", help="Largest image, width x height (413 past it)."),
    max_classes: int = typer.Option(256, "--max-classes", help="Class names one request may ask to score."),
    max_batch: int = typer.Option(32, "--max-batch", help="Images encoded in one forward pass."),
    batch_wait_ms: float = typer.Option(
        5.0, "--batch-wait-ms", help="How long a request waits for others to batch with."
    ),
    queue_size: int = typer.Option(128, "--queue-size", help="Images admitted at once; past it, 503 + Retry-After."),
    request_timeout: float = typer.Option(30.0, "--request-timeout", help="Seconds a request may wait (503 past it)."),
    max_connections: int = typer.Option(512, "--max-connections", help="Open connections before uvicorn answers 503."),
    pretrained: Path | None = typer.Option(
        None,
        "--pretrained",
        "-p",
        help="Local checkpoint for adapters trained on one, if not where they were trained (sha256-checked).",
    ),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    cache_dir: str | None = CacheDirOpt,
) -> None:
    """Serve adapters over HTTP: POST /v1/classify, GET /v1/adapters, /healthz, /readyz, /metrics.

    Adapters on the same backbone share one copy of it; `adapter=all` answers every frozen-tower adapter
    (zeroshot, linear-probe, tip-adapter, coop, rada) from one image encoding. Adapter files are read at
    start and again on SIGHUP (`kill -HUP PID`), never from a request. Needs `pip install 'adaclip\\[serve]'`.

    Examples:

        adaclip serve pets.adaclip birds=./models/birds.adaclip --port 8000

        curl -F image=@cat.jpg 'http://127.0.0.1:8000/v1/classify?adapter=pets&top_k=3'
    """
    plan = _serve_plan(**locals())  # only the parameters so far
    from ..serve import run_server

    run_server(
        plan.specs,
        plan.settings,
        host=host,
        port=port,
        token=plan.token,
        max_connections=max_connections,
        log_level="warning" if log.level == 0 else "info",
        **plan.load_options,
    )


class _ServePlan:
    """What `adaclip serve`'s options amount to, checked: shared by the command and the ASGI factory."""

    def __init__(self, specs, settings, token, load_options, given):
        self.specs, self.settings, self.token = specs, settings, token
        self.load_options: dict[str, Any] = load_options
        self.given: set[str] = given  # the options given on the command line (not defaults)


def _serve_plan(*, given: set[str] | None = None, **options: Any) -> _ServePlan:
    """Check every option and name every adapter file before anything heavy is loaded."""
    try:
        from ..serve import make_settings, parse_adapter_specs
        from ..serve.security import is_loopback, read_token_file
    except ImportError as exc:
        raise UsageError(
            f"adaclip serve needs the serve extra ({exc.name} is missing)", fix="pip install 'adaclip[serve]'"
        ) from None

    o = options
    settings = make_settings(
        max_upload_mb=o["max_upload_mb"],
        max_images=o["max_images"],
        max_pixels=o["max_pixels"],
        max_classes=o["max_classes"],
        max_batch=o["max_batch"],
        batch_wait_ms=o["batch_wait_ms"],
        queue_size=o["queue_size"],
        request_timeout_s=o["request_timeout"],
    )
    if not 0 <= o["port"] <= 65535:
        raise UsageError(f"--port must be 0 to 65535, got {o['port']}")
    if o["max_connections"] < 1:
        raise UsageError("--max-connections must be at least 1")
    token = read_token_file(o["token_file"]) if o["token_file"] is not None else None
    pretrained = o["pretrained"]
    if pretrained is not None and not pretrained.is_file():
        raise UsageError("checkpoint file not found", path=pretrained, fix="give the checkpoint file (--pretrained)")
    specs = parse_adapter_specs(o["adapters"])  # names and files are checked before anything heavy
    if not is_loopback(o["host"]) and token is None:
        log.warning(f"listening on {o['host']} without --token-file: anyone who can reach this port can use the API")
    load_options = {
        "pretrained": str(pretrained) if pretrained is not None else None,
        "device": o["device"],
        "precision": o["precision"],
        "cache_dir": o["cache_dir"],
    }
    return _ServePlan(specs, settings, token, load_options, given or set())


def serve_plan(args: list[str]) -> _ServePlan:
    """`adaclip serve ARGS...` parsed and checked as the command does, without serving (for
    adaclip.serve.asgi); `--host` and the like are parsed and checked but are the caller's to use."""
    from typer.main import get_command

    use_cli_names()  # messages name --options, as the command's do
    command = get_command(app).commands["serve"]  # type: ignore[attr-defined]
    try:
        context = command.make_context("adaclip serve", list(args))
    except typer.Exit:
        raise UsageError("asked for help: give adapter files and options") from None
    except typer.TyperException as exc:  # typer's own click: a bad or unknown option, a missing argument
        raise UsageError(exc.format_message()) from None  # type: ignore[attr-defined]
    given = {
        f"--{name.replace('_', '-')}" for name in context.params if context.get_parameter_source(name).name != "DEFAULT"
    }
    return _serve_plan(given=given, **context.params)
