"""Prometheus metrics, in a registry of the app's own (several apps in one process,
as in the tests, never collide in the global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Seconds: sub-millisecond health probes up to multi-second explanations of big volumes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
UPLOAD_BUCKETS = tuple(float(2**k) for k in range(10, 26, 2))  # 1 KiB .. 32 MiB


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "braincam_requests",
            "HTTP requests by route template, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "braincam_request_duration_seconds",
            "HTTP request latency by route template",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "braincam_inference_duration_seconds",
            "ONNX Runtime run time by graph (classifier, gradcam; occlusion: its classifier runs)",
            ["graph"],
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "braincam_errors",
            "Error responses by status and code",
            ["status", "code"],
            registry=r,
        )
        self.upload_bytes = Histogram(
            "braincam_upload_bytes",
            "Size of accepted uploads in bytes",
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.in_progress = Gauge(
            "braincam_inference_in_progress",
            "Requests holding an inference slot (bounded by BRAINCAM_MAX_CONCURRENCY)",
            registry=r,
        )
        self.out_of_distribution = Counter(
            "braincam_out_of_distribution",
            "Inputs the out-of-distribution gate flagged, by endpoint and policy",
            ["endpoint", "policy"],
            registry=r,
        )
        self.model_ready = Gauge(
            "braincam_model_ready", "1 once the model is loaded and warm", registry=r
        )

    def error(self, status: int, code: str) -> None:
        self.errors.labels(status=str(status), code=code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
