"""Prometheus metrics of one server (its own registry: two apps in one process never mix counts)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = ("/v1/classify", "/v1/adapters", "/healthz", "/readyz", "/metrics")


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "adaclip_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "adaclip_request_seconds",
            "Time from request to response, by route.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.answers = Counter(
            "adaclip_predictions", "Image predictions returned, by adapter.", ["adapter"], registry=r
        )
        self.unreadable = Counter(
            "adaclip_unreadable_images", "Uploaded images that could not be used, by reason.", ["reason"], registry=r
        )
        self.encoded = Counter(
            "adaclip_images_encoded",
            "Images passed through an image tower (once per image for adapter=all).",
            registry=r,
        )
        self.batch_images = Histogram(
            "adaclip_batch_images", "Images per encoded batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.queue = Gauge("adaclip_queue_images", "Images admitted and not yet taken into a batch.", registry=r)
        self.rejected = Counter("adaclip_rejected", "Requests refused with 503 because the queue was full.", registry=r)
        self.adapters = Gauge("adaclip_adapters_loaded", "Adapters being served.", registry=r)
        self.backbones = Gauge("adaclip_backbone_copies", "Backbone copies in memory.", registry=r)
        self.reloads = Counter("adaclip_reloads", "Adapter reloads (SIGHUP), by result.", ["result"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
