"""`adaclip serve`: many adapters over one copy of each backbone, behind an HTTP API.

Needs the `serve` extra (`pip install 'adaclip[serve]'`: Starlette, uvicorn, python-multipart,
prometheus-client). Pieces: `registry` (which adapters, grouped by backbone), `batching` (dynamic
batches on one worker thread), `inputs` (request parsing and limits), `security` (token, bind address),
`app` (routes), `metrics`.

    from adaclip.serve import parse_adapter_specs, load_adapter_set, Service, create_app, ServeSettings
    specs = parse_adapter_specs(["pets=pets.adaclip", "zs.adaclip"])
    service = Service(load_adapter_set(specs), ServeSettings())
    app = create_app(service)     # any ASGI server runs it

`asgi.create_from_env` builds the same app from `adaclip serve`'s options, for uvicorn --workers or
gunicorn (several replicas behind one port).
"""

from __future__ import annotations

from .app import Service, create_app
from .registry import AdapterSet, AdapterSpec, ServedAdapter, load_adapter_set, parse_adapter_specs
from .settings import ServeSettings, make_settings

__all__ = [
    "AdapterSet",
    "AdapterSpec",
    "ServeSettings",
    "ServedAdapter",
    "Service",
    "create_app",
    "load_adapter_set",
    "make_settings",
    "build_app",
    "parse_adapter_specs",
    "run_server",
]


def build_app(
    specs: list[AdapterSpec],
    settings: ServeSettings,
    *,
    token: str | None = None,
    pretrained: str | None = None,
    device: str | None = None,
    precision: str = "auto",
    cache_dir: str | None = None,
):
    """Load the adapters and return the ASGI app; SIGHUP re-reads the adapter files (when the app runs
    in the main thread of its process)."""
    from ..ui import log

    _one_malloc_arena()
    options = {"pretrained": pretrained, "device": device, "precision": precision, "cache_dir": cache_dir}
    adapters = load_adapter_set(specs, **options)

    def reload_files(current: AdapterSet) -> AdapterSet:
        return load_adapter_set(
            specs, backbones=current.backbones.values(), generation=current.generation + 1, **options
        )

    for served in adapters.adapters.values():
        tower = "frozen image tower" if served.frozen_image_tower else "adapts the image tower"
        log.info(f"{served.name}: {served.adapter.method} on {served.adapter.backbone.identity.describe()} ({tower})")
    log.info(f"{len(adapters.adapters)} adapters on {len(adapters.backbones)} backbone copies")
    service = Service(adapters, settings, reloader=reload_files)
    return create_app(service, token=token)


def run_server(
    specs: list[AdapterSpec],
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_connections: int = 512,
    log_level: str = "info",
    **options,
) -> None:
    """Load the adapters (`options`: as build_app's), then serve until SIGINT/SIGTERM."""
    import uvicorn

    from ..ui import log

    app = build_app(specs, settings, **options)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # per-request lines cost CPU under load; /metrics counts requests
        limit_concurrency=max_connections,  # past it uvicorn answers 503 itself
        timeout_keep_alive=5,
        server_header=False,
    )
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: that is a clean stop
        log.info("stopped")


def _one_malloc_arena() -> None:
    """glibc gives each new thread its own malloc arena, and those hand large blocks (a batch's
    activations) back to the OS after every batch, so the batcher thread encoded large batches much
    slower than the main thread (measured: docs/benchmarks.md, serve). One arena keeps every thread on
    the main heap, which honours MALLOC_MMAP_THRESHOLD_ (see the Makefile's bench settings)."""
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("MALLOC_ARENA_MAX"):
        return  # the user chose
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 1)  # M_ARENA_MAX = -8 in glibc's malloc.h
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune
