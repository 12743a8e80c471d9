"""The limits a server runs under: every one is a command-line option of `adaclip serve`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import UsageError


class ServeSettings(BaseModel):
    """Request limits and batching policy. Defaults suit a CPU machine; raise `max_batch` on a GPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_upload_mb: float = Field(20.0, gt=0, description="largest request body, in MiB (413 past it)")
    max_images: int = Field(32, ge=1, description="images in one request (413 past it)")
    max_pixels: int = Field(
        25_000_000, ge=1, description="largest image, width x height, before decoding (decompression-bomb guard)"
    )
    max_classes: int = Field(256, ge=2, description="class names one request may ask to score (`classes`)")
    max_batch: int = Field(32, ge=1, description="images encoded in one forward pass")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long the first request of a batch waits for more")
    queue_size: int = Field(128, ge=1, description="images admitted (decoding or waiting) before 503s")
    request_timeout_s: float = Field(30.0, gt=0, description="longest a request waits for its answer (503 past it)")

    @model_validator(mode="after")
    def _one_request_fits_the_queue(self) -> ServeSettings:
        if self.max_images > self.queue_size:
            raise ValueError(
                f"--max-images {self.max_images} is larger than --queue-size {self.queue_size}: "
                "such a request could never be admitted"
            )
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def make_settings(**values) -> ServeSettings:
    """ServeSettings from option values; a bad value becomes one UsageError line naming the option."""
    try:
        return ServeSettings(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = "-".join(str(part) for part in error.get("loc", ())) or "settings"
        option = field.replace("_", "-").replace("request-timeout-s", "request-timeout")
        message = error.get("msg", "invalid value").removeprefix("Value error, ")
        raise UsageError(f"--{option}: {message}" if option != "settings" else message) from None
