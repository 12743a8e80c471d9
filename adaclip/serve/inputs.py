"""Reading a classify request: body size limit, multipart / JSON+base64 / raw image bodies, parameters,
and decoding the images. Everything a client can get wrong becomes an `ApiError` with its 4xx status;
one unreadable image in a many-image request only marks its own entry."""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from ..errors import UnreadableImageError
from ..images import load_image
from .settings import ServeSettings

PARAMETERS = ("adapter", "top_k", "classes")
MAX_CLASS_NAME = 200
DEFAULT_TOP_K = 5
# Statuses of unusable images, by UnreadableImageError.kind (plus bad base64).
IMAGE_STATUS = {"not_image": 415, "too_large": 413, "corrupt": 422, "bad_base64": 422}


class ApiError(Exception):
    """A response with a 4xx/5xx status and `{"error": message, ...}`."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any):
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra
        super().__init__(message)


@dataclass
class Upload:
    name: str
    data: bytes | str  # bytes, or base64 text (decoded off the event loop)


@dataclass
class ClassifyRequest:
    adapter: str | None
    top_k: int
    classes: list[str] | None
    uploads: list[Upload] = field(default_factory=list)


@dataclass
class PreparedImage:
    name: str
    pixels: dict[str, torch.Tensor] | None = None  # transform key -> (3, H, W)
    error: str | None = None
    kind: str | None = None

    @property
    def status(self) -> int:
        return IMAGE_STATUS.get(self.kind or "corrupt", 422)


# ------------------------------------------------------------------------------------------ body


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (announced or counted)."""
    too_large = ApiError(
        413, f"request body is larger than the server's {limit / 1048576:g} MiB limit (--max-upload-mb)"
    )
    announced = request.headers.get("content-length")
    if announced is not None:
        if not announced.isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if int(announced) > limit:
            await _drain(request, int(announced))
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await _drain(request, 4 * limit)
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, cap: int) -> None:
    """Read and drop what the client is still sending (up to `cap`), so it sees the 413 rather than a
    reset connection; a larger body is cut off."""
    dropped = 0
    cap = min(cap, 256 * 1024 * 1024)
    try:
        async for chunk in request.stream():
            dropped += len(chunk)
            if dropped > cap:
                return
    except Exception:  # noqa: BLE001 - the client went away: nothing left to read
        return


# ------------------------------------------------------------------------------------------ parsing


async def parse_classify(request: Request, settings: ServeSettings) -> ClassifyRequest:
    unknown = sorted(set(request.query_params) - set(PARAMETERS))
    if unknown:
        raise ApiError(422, f"unknown query parameter {unknown[0]!r}", allowed=list(PARAMETERS))
    values: dict[str, Any] = {}
    for name in PARAMETERS:
        if name in request.query_params:
            values[name] = request.query_params[name]
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/json") and not content_type.startswith("image/"):
        raise ApiError(
            415,
            f"unsupported Content-Type {content_type or '(none)'!r}",
            fix="send multipart/form-data (file fields), application/json ({'images': [base64, ...]}) or image/*",
        )
    body = await read_body(request, settings.max_upload_bytes)
    if content_type == "multipart/form-data":
        uploads, fields = await _parse_multipart(request, body, settings)
    elif content_type == "application/json":
        uploads, fields = _parse_json(body)
    else:
        uploads, fields = [Upload("image", body)], {}
    for name, value in fields.items():
        if name in values and values[name] != value:
            raise ApiError(422, f"{name} is given twice with different values (query and body)")
        values[name] = value
    if not uploads:
        raise ApiError(422, "no image in the request", fix="attach image files, or send {'images': [...]}")
    if len(uploads) > settings.max_images:
        raise ApiError(
            413, f"{len(uploads)} images in one request; this server takes at most {settings.max_images} (--max-images)"
        )
    adapter = values.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise ApiError(422, "adapter must be a name (a string)")
    return ClassifyRequest(
        adapter=adapter or None,
        top_k=_parse_top_k(values.get("top_k", DEFAULT_TOP_K)),
        classes=_parse_classes(values.get("classes"), settings.max_classes),
        uploads=uploads,
    )


async def _parse_multipart(request: Request, body: bytes, settings: ServeSettings):
    async def replay():
        yield body

    parser = MultiPartParser(
        request.headers, replay(), max_files=settings.max_images, max_fields=len(PARAMETERS), max_part_size=1 << 20
    )
    parser.spool_max_size = settings.max_upload_bytes  # the body is bounded and in memory already: no temp files
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise ApiError(
                413, f"too many images in one request; at most {settings.max_images} (--max-images)"
            ) from None
        raise ApiError(400, f"malformed multipart body: {exc.message}") from None
    uploads, fields = [], {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append(Upload(value.filename or name, await value.read()))
            elif name in PARAMETERS:
                fields[name] = value
            else:
                raise ApiError(422, f"unknown form field {name!r}", allowed=list(PARAMETERS))
    finally:
        await form.close()
    return uploads, fields


def _parse_json(body: bytes):
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ApiError(422, "JSON body must be an object: {'images': [...], 'adapter': ..., 'top_k': ...}")
    unknown = sorted(set(document) - {"images", *PARAMETERS})
    if unknown:
        raise ApiError(422, f"unknown JSON field {unknown[0]!r}", allowed=["images", *PARAMETERS])
    images = document.get("images")
    if not isinstance(images, list):
        raise ApiError(422, "'images' must be a list of base64 strings or {'name': ..., 'data': base64} objects")
    uploads = []
    for index, item in enumerate(images):
        if isinstance(item, str):
            uploads.append(Upload(f"#{index}", item))
        elif isinstance(item, dict) and isinstance(item.get("data"), str) and set(item) <= {"name", "data"}:
            name = item.get("name", f"#{index}")
            uploads.append(Upload(name if isinstance(name, str) else f"#{index}", item["data"]))
        else:
            raise ApiError(422, f"images[{index}] must be a base64 string or {{'name': ..., 'data': base64}}")
    return uploads, {k: document[k] for k in PARAMETERS if k in document}


def _parse_top_k(value: Any) -> int:
    if isinstance(value, bool):
        raise ApiError(422, "top_k must be a whole number of at least 1")
    try:
        top_k = int(value) if isinstance(value, (int, str)) else None
    except ValueError:
        top_k = None
    if top_k is None or top_k < 1:
        raise ApiError(422, f"top_k must be a whole number of at least 1, got {value!r}")
    return top_k


def _parse_classes(value: Any, limit: int) -> list[str] | None:
    """A JSON list of names, or (form fields) a JSON list as text or one name per line."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ApiError(422, "classes is not a valid JSON list") from None
        else:
            value = [line for line in text.splitlines() if line.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(422, "classes must be a list of class names")
    names = [v.strip() for v in value]
    if any(not name or len(name) > MAX_CLASS_NAME for name in names):
        raise ApiError(422, f"class names must be 1 to {MAX_CLASS_NAME} characters")
    if len(set(names)) != len(names):
        raise ApiError(422, "classes lists a name twice")
    if not 2 <= len(names) <= limit:
        raise ApiError(422, f"classes must name 2 to {limit} classes (--max-classes), got {len(names)}")
    return names


# ------------------------------------------------------------------------------------------ decoding


def prepare_images(uploads: list[Upload], transforms: dict[str, Callable], max_pixels: int) -> list[PreparedImage]:
    """Decode each upload once and apply each distinct transform (runs in a worker thread)."""
    prepared = []
    for upload in uploads:
        data = upload.data
        if isinstance(data, str):
            try:
                data = _b64decode(data)
            except (binascii.Error, ValueError):
                prepared.append(PreparedImage(upload.name, error="not valid base64", kind="bad_base64"))
                continue
        try:
            image = load_image(upload.name, max_pixels=max_pixels, data=io.BytesIO(data))
        except UnreadableImageError as exc:
            reason = "not a recognised image format" if exc.kind == "not_image" else exc.reason
            prepared.append(PreparedImage(upload.name, error=reason, kind=exc.kind))
            continue
        prepared.append(PreparedImage(upload.name, pixels={key: t(image) for key, t in transforms.items()}))
    return prepared


def _b64decode(text: str) -> bytes:
    if text.startswith("data:"):  # a data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    return base64.b64decode(text, validate=True)
