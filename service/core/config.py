"""Service settings, read from `BRAINCAM_*` environment variables (see docs/api.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
BatchingMode = Literal["auto", "on", "off"]
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

# Room for the multipart envelope (boundaries, part headers, the small form fields)
# on top of the file itself, when the whole request body is bounded.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


class Settings(BaseSettings):
    """Every setting has an environment variable: the field name upper-cased, prefixed."""

    # env_ignore_empty: `BRAINCAM_X=` (compose passes unset values that way) means default.
    model_config = SettingsConfigDict(env_prefix="BRAINCAM_", extra="ignore", env_ignore_empty=True)

    model_dir: Path = Path("models/demo")
    # Comma-separated lists are plain strings here: pydantic-settings would parse a
    # list field from the environment as JSON, and `A,B` is what people type.
    providers: str = "CUDAExecutionProvider,CPUExecutionProvider"
    cors_origins: str = ""
    max_upload_mb: float = Field(default=20.0, gt=0)
    # Hardening (docs/security.md): decoded-size budget checked from image headers,
    # a deadline for a request's blocking work, an optional API key (X-API-Key).
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    request_timeout_s: float = Field(default=30.0, gt=0)
    api_key: SecretStr | None = None
    # Series routes (/predict/series, /explain/series, /dicomweb/analyze): their own
    # upload bound, and the bounds of one series (braincam.series.SeriesLimits).
    max_series_upload_mb: float = Field(default=200.0, gt=0)
    max_series_slices: int = Field(default=512, ge=1)
    max_series_pixels: int = Field(default=256 * 1024 * 1024, ge=1)
    max_zip_entries: int = Field(default=2048, ge=1)
    max_zip_ratio: float = Field(default=200.0, gt=1)
    # The PACS POST /dicomweb/analyze talks to (its DICOMweb root); the route is off
    # unless this and an API key are set: it reads from and writes to that PACS.
    dicomweb_url: str | None = None
    dicomweb_timeout_s: float = Field(default=30.0, gt=0)
    intra_op_threads: int = Field(default=0, ge=0)  # 0: ONNX Runtime's default (one per core)
    # ORT's intra-op threads spin-wait between runs by default. With several requests
    # in flight the spinning threads burn the cores the others need; off, they sleep
    # and one request still gets every core (`python -m benchmarks` measures both).
    ort_spinning: bool = False
    max_concurrency: int = Field(default=4, ge=1)
    # Unset: /explain writes PNGs with fpng (~20x faster than libpng at level 1 on a
    # 1024x1024 overlay, files ~1.3x larger); 0..9: libpng at that zlib level.
    png_compression: int | None = Field(default=None, ge=0, le=9)
    # Micro-batching (service/batching.py): concurrent requests share one ORT run.
    # auto: on when the session runs on a GPU provider, off on the CPU, where
    # `python -m benchmarks` measures it losing to request-level parallelism.
    batching: BatchingMode = "auto"
    batch_max_size: int = Field(default=16, ge=1, le=1024)
    batch_max_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    # /explain method=occlusion for models that have a Grad-CAM graph too (models
    # without one always offer it): one classifier run per 32 occluding windows.
    occlusion: bool = False
    # What happens to an input the out-of-distribution gate flags: answered with
    # `in_distribution: false` (warn), or refused with a 422 `out_of_distribution`.
    ood_policy: Literal["warn", "reject"] = "warn"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1)
    log_level: LogLevel = "info"

    @field_validator("providers", "cors_origins", mode="before")
    @classmethod
    def _join_lists(cls, value: Any) -> Any:
        # Settings(providers=["CPUExecutionProvider"]) works as well as the env string.
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return value

    @field_validator("batching", mode="before")
    @classmethod
    def _batching(cls, value: Any) -> Any:
        # true/false (and 1/0, yes/no) as before "auto" existed: on/off.
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            text = value.strip().lower()
            return "on" if text in _TRUE else "off" if text in _FALSE else text
        return value

    @field_validator("log_level", "ood_policy", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def provider_list(self) -> list[str]:
        return _split(self.providers) or ["CPUExecutionProvider"]

    @property
    def cors_origin_list(self) -> list[str]:
        return _split(self.cors_origins)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_series_upload_bytes(self) -> int:
        return int(self.max_series_upload_mb * 1024 * 1024)
