"""The HTTP API: a Starlette app over one `AdapterSet` and one `Batcher`.

POST /v1/classify      images -> predictions of one adapter, or of every frozen-tower adapter
                       (`adapter=all`) from one encoding
GET  /v1/adapters      what `adaclip info` says of each adapter, plus serving facts
GET  /healthz          the process answers
GET  /readyz           the batcher runs and the queue has room (503 otherwise)
GET  /metrics          Prometheus text format
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import AdaclipError
from ..output import dumps
from ..predictions import Prediction
from ..ui import log
from .batching import Batcher, HeadRequest, Job, JobResult, QueueFull, ShuttingDown
from .inputs import ApiError, ClassifyRequest, PreparedImage, parse_classify
from .metrics import ROUTES, ServeMetrics
from .registry import ALL, AdapterSet, ServedAdapter
from .security import OPEN_PATHS, token_matches
from .settings import ServeSettings


def json_response(document: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # adaclip's own JSON writer: the records are exactly `predict --format json`'s (NaN -> null).
    return Response(dumps(document, indent=None), status_code=status, headers=headers, media_type="application/json")


@dataclass
class _Group:
    """The heads answered from one image encoding."""

    encoder: ServedAdapter
    heads: list[HeadRequest]


class Service:
    """Holds the served adapters (swapped whole on reload), the batcher and the metrics."""

    def __init__(
        self,
        adapters: AdapterSet,
        settings: ServeSettings,
        *,
        reloader: Callable[[AdapterSet], AdapterSet] | None = None,
    ):
        self.adapters = adapters
        self.settings = settings
        self.reloader = reloader
        self.metrics = ServeMetrics()
        self.batcher = Batcher(
            max_batch=settings.max_batch,
            wait_s=settings.batch_wait_ms / 1000,
            capacity=settings.queue_size,
            metrics=self.metrics,
        )
        self._tasks: set[asyncio.Task] = set()
        self._count_adapters()

    def _count_adapters(self) -> None:
        self.metrics.adapters.set(len(self.adapters.adapters))
        self.metrics.backbones.set(len(self.adapters.backbones))

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        warm_up(self.adapters)
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    def schedule_reload(self) -> None:
        task = asyncio.ensure_future(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> bool:
        """Re-read the adapter files given at start (between two batches); on any failure the adapters
        served so far stay."""
        if self.reloader is None:
            log.warning("reload asked for, but this server was not given files to reload")
            return False
        current = self.adapters
        log.info("reloading adapters")

        def load_new() -> AdapterSet:
            new = self.reloader(current)
            warm_up(new)
            return new

        try:
            new = await self.batcher.run_between_batches(load_new)
        except Exception as exc:  # noqa: BLE001 - a bad file must not take the server down
            message = exc.one_line() if isinstance(exc, AdaclipError) else f"{type(exc).__name__}: {exc}"
            log.error(f"reload failed, still serving the previous adapters: {message}")
            self.metrics.reloads.labels("error").inc()
            return False
        self.adapters = new
        self._count_adapters()
        self.metrics.reloads.labels("ok").inc()
        log.info(f"reloaded: serving {', '.join(new.adapters)}")
        return True

    # --- endpoints --------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        ready = self.batcher.alive and not self.batcher.full
        document = {
            "status": "ready" if ready else "not ready",
            "adapters": len(self.adapters.adapters),
            "worker_alive": self.batcher.alive,
            "queue_full": self.batcher.full,
        }
        return json_response(document, 200 if ready else 503)

    async def list_adapters(self, request: Request) -> Response:
        adapters = self.adapters
        return json_response({"generation": adapters.generation, "adapters": adapters.describe()})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def classify(self, request: Request) -> Response:
        query = await parse_classify(request, self.settings)
        adapters = self.adapters  # one snapshot for the whole request, even across a reload
        targets, not_included = self._targets(query, adapters)
        groups = self._groups(targets, query)
        images = len(query.uploads)
        outstanding = images * len(groups)
        try:
            self.batcher.reserve(outstanding)
        except QueueFull as exc:
            self.metrics.rejected.inc()
            raise ApiError(
                503, "the server is at capacity; retry shortly", headers={"Retry-After": str(exc.retry_after)}
            ) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": "1"}) from None
        loop = asyncio.get_running_loop()
        jobs: list[Job] = []
        try:
            for group in groups:
                job = Job(
                    group.encoder.encoder_key,
                    group.encoder,
                    query.uploads,
                    group.heads,
                    loop.create_future(),
                    loop,
                    max_pixels=self.settings.max_pixels,
                )
                self.batcher.submit(job)
                outstanding -= job.size
                jobs.append(job)
            try:
                answers: list[JobResult] = await asyncio.wait_for(
                    asyncio.gather(*(job.future for job in jobs)), self.settings.request_timeout_s
                )
            except TimeoutError:
                raise ApiError(
                    503, "timed out waiting for the model (--request-timeout)", headers={"Retry-After": "1"}
                ) from None
            except ShuttingDown:
                raise ApiError(503, "the server is shutting down", headers={"Retry-After": "1"}) from None
        finally:
            if outstanding > 0:
                self.batcher.release(outstanding)
        prepared = answers[0].images
        for item in prepared:
            if item.pixels is None:
                self.metrics.unreadable.labels(item.kind or "corrupt").inc()
        if all(item.pixels is None for item in prepared):
            first = prepared[0]
            raise ApiError(
                first.status, f"{first.name}: {first.error}", predictions=[_error_record(p) for p in prepared]
            )
        results = []
        for group, answer in zip(groups, answers, strict=True):
            for head, predictions in zip(group.heads, answer.predictions, strict=True):
                self.metrics.answers.labels(head.adapter.name).inc(len(predictions))
                results.append((head.adapter, _records(answer.images, predictions)))
        order = {adapter.name: i for i, adapter in enumerate(targets)}
        results.sort(key=lambda pair: order[pair[0].name])
        if query.adapter == ALL:
            document = {
                "adapter": ALL,
                "results": [
                    {"adapter": adapter.name, "method": adapter.adapter.method, "predictions": records}
                    for adapter, records in results
                ],
                "not_included": not_included,
            }
        else:
            adapter, records = results[0]
            document = {"adapter": adapter.name, "method": adapter.adapter.method, "predictions": records}
        return json_response(document)

    def _targets(self, query: ClassifyRequest, adapters: AdapterSet) -> tuple[list[ServedAdapter], list[str]]:
        name = query.adapter
        if name is None:
            if len(adapters.adapters) != 1:
                raise ApiError(422, "say which adapter: adapter=NAME or adapter=all", adapters=list(adapters.adapters))
            return list(adapters.adapters.values()), []
        if name == ALL:
            if query.classes is not None:
                raise ApiError(422, "classes cannot be combined with adapter=all", fix="ask one adapter by name")
            frozen = adapters.frozen()
            if not frozen:
                raise ApiError(422, "adapter=all answers with frozen-tower adapters, and none is loaded")
            return frozen, [a.name for a in adapters.unfrozen()]
        target = adapters.get(name)
        if target is None:
            raise ApiError(404, f"no adapter named {name!r}", adapters=list(adapters.adapters))
        if query.classes is not None and not target.class_agnostic:
            raise ApiError(
                422,
                f"adapter {name!r} ({target.adapter.method}) is tied to the classes it was trained on",
                fix="drop classes, or use a class-agnostic adapter (zeroshot, coop, rada, adaring, lora)",
            )
        return [target], []

    @staticmethod
    def _groups(targets: list[ServedAdapter], query: ClassifyRequest) -> list[_Group]:
        groups: dict[tuple[str, ...], _Group] = {}
        for target in targets:
            group = groups.setdefault(target.encoder_key, _Group(target, []))
            group.heads.append(HeadRequest(target, query.classes, query.top_k))
        return list(groups.values())


def warm_up(adapters: AdapterSet) -> None:
    """Encode each adapter's class prompts now, not on its first request."""
    with torch.no_grad():
        for served in adapters.adapters.values():
            served.adapter.model.eval()
            served.adapter.model.class_features()


def _error_record(item: PreparedImage) -> dict[str, Any]:
    return Prediction(item.name, None, None, None, error=item.error).to_dict()


def _records(prepared: list[PreparedImage], predictions: list[Prediction]) -> list[dict[str, Any]]:
    """Records in upload order: predictions for readable images, error entries for the others."""
    answers = iter(predictions)
    records = []
    for item in prepared:
        if item.pixels is None:
            records.append(_error_record(item))
        else:
            prediction = next(answers)
            prediction.path = item.name
            records.append(prediction.to_dict())
    return records


# ------------------------------------------------------------------------------------------ the app


class Gate:
    """ASGI middleware: the bearer-token check and per-route request metrics."""

    def __init__(self, app, service: Service, token: str | None):
        self.app = app
        self.service = service
        self.token = token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        started = time.perf_counter()
        status = [500]

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if (
                self.token
                and path not in OPEN_PATHS
                and not token_matches(_header(scope, b"authorization"), self.token)
            ):
                response = json_response(
                    {"error": "missing or wrong bearer token"}, 401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send_and_record)
            else:
                await self.app(scope, receive, send_and_record)
        finally:
            metrics = self.service.metrics
            metrics.requests.labels(route, str(status[0])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return json_response({"error": exc.message, **exc.extra}, exc.status, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_response({"error": exc.detail}, exc.status_code, dict(exc.headers or {}))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error(f"unexpected {type(exc).__name__} answering {request.url.path}: {exc}")
    return JSONResponse({"error": "internal error"}, 500)


def create_app(service: Service, *, token: str | None = None, reload_on_sighup: bool = True) -> Gate:
    """The ASGI app (Starlette inside the token/metrics gate). The lifespan starts and stops the
    batcher and, in the main thread, makes SIGHUP reload the adapter files."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        loop = asyncio.get_running_loop()
        handled = False
        if reload_on_sighup and service.reloader is not None and threading.current_thread() is threading.main_thread():
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
                loop.add_signal_handler(signal.SIGHUP, service.schedule_reload)
                handled = True
        try:
            yield
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGHUP)
            await run_in_threadpool(service.stop)

    routes = [
        Route("/v1/classify", service.classify, methods=["POST"]),
        Route("/v1/adapters", service.list_adapters, methods=["GET"]),
        Route("/healthz", service.healthz, methods=["GET"]),
        Route("/readyz", service.readyz, methods=["GET"]),
        Route("/metrics", service.metrics_text, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error},
    )
    app.state.service = service
    return Gate(app, service, token)
