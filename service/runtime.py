"""The served model: loaded once, warmed up in a background thread, then shared.

ONNX Runtime sessions are thread-safe for `run`, so one `OnnxModel` serves every
request. The blocking work (decoding, ORT, CAM, PNG encoding) runs off the event
loop, so /health and /ready answer however busy the model is, in a pool of
`BRAINCAM_MAX_CONCURRENCY` threads: that bounds concurrent inference (requests
beyond it queue), and the threads live as long as the app. Long-lived threads
matter: OpenCV initialises its fonts per thread (~20 ms, paid by the first
/explain in each new thread), and a generic pool such as anyio's retires idle
threads after seconds; these are warmed once, at start-up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

from braincam.decoding import pixel_budget
from braincam.inference import OnnxModel
from service import pipeline
from service.batching import ModelBatchers
from service.core.config import Settings
from service.errors import ModelUnavailable, RequestTimeout
from service.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
Status = Literal["loading", "ok", "error"]


def batching_decision(settings: Settings, model: OnnxModel) -> tuple[bool, str]:
    """Whether requests are micro-batched, and why (logged, shown in /metadata)."""
    mode = settings.batching
    if mode != "auto":
        return mode == "on", f"BRAINCAM_BATCHING={mode}"
    active = ", ".join(model.providers.active)
    if model.providers.gpu:
        return True, f"BRAINCAM_BATCHING=auto and the session runs on a GPU ({active})"
    return False, (
        f"BRAINCAM_BATCHING=auto and the session runs on {active}: on the CPU, "
        "per-image cost does not fall with the batch size"
    )


class ModelRuntime:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: OnnxModel | None = None  # set only once warm: `ready` reads it
        self.error: str | None = None
        self.load_seconds: float | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batchers: ModelBatchers | None = None  # set at load when batching is on
        self.batching_reason: str = "the model is not loaded"

    @property
    def ready(self) -> bool:
        return self.model is not None

    @property
    def status(self) -> Status:
        if self.model is not None:
            return "ok"
        return "error" if self.error is not None else "loading"

    def start(self) -> None:
        """Load in the background: /health must answer while sessions are built."""
        if self._thread is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.settings.max_concurrency, thread_name_prefix="braincam-worker"
            )
            self._thread = threading.Thread(
                target=self.load, name="braincam-model-load", daemon=True
            )
            self._thread.start()

    def load(self) -> None:
        settings = self.settings
        started = time.perf_counter()
        try:
            model = OnnxModel(
                settings.model_dir,
                providers=settings.provider_list,
                intra_op_threads=settings.intra_op_threads or None,
                allow_spinning=settings.ort_spinning,
            )
            model.warmup()
            pipeline.warmup(model)
            self._warm_workers()
        except Exception as exc:  # any failure leaves the process up, reporting why
            self.error = self._describe(exc)
            # One line that says why (what `docker compose logs` shows); the traceback
            # only at debug level.
            reason = "; ".join(line.strip() for line in self.error.splitlines() if line.strip())
            log.error("could not load the model from %s: %s", settings.model_dir, reason)
            log.debug("model load traceback", exc_info=True)
        else:
            self.load_seconds = round(time.perf_counter() - started, 3)
            active, self.batching_reason = batching_decision(settings, model)
            log.info("micro-batching %s: %s", "on" if active else "off", self.batching_reason)
            if active:
                self.batchers = ModelBatchers(
                    model,
                    self.metrics,
                    settings.batch_max_size,
                    settings.batch_max_wait_ms / 1000.0,
                )
            self.model = model
            self.metrics.model_ready.set(1)
            spec = model.spec
            log.info(
                "model %s v%s ready in %.2f s on %s",
                spec.name,
                spec.version,
                self.load_seconds,
                ", ".join(model.providers.active),
            )
        finally:
            self._done.set()

    def _warm_workers(self) -> None:
        """Start every pool thread now and let each pay its one-off set-up cost."""
        executor = self._executor
        if executor is None:
            return
        n = self.settings.max_concurrency
        # Each task waits for the others, so the pool must start n distinct threads.
        barrier = threading.Barrier(n)

        def warm() -> None:
            pipeline.warm_thread()
            barrier.wait(timeout=60)

        for future in [executor.submit(warm) for _ in range(n)]:
            future.result()

    def close(self) -> None:
        if self.batchers is not None:
            self.batchers.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _describe(self, exc: Exception) -> str:
        """The reason for /health, without the server's file-system paths."""
        model_dir = self.settings.model_dir
        if not model_dir.is_dir():
            return "the model directory (BRAINCAM_MODEL_DIR) does not exist"
        message = f"{type(exc).__name__}: {exc}"
        for path in sorted({str(model_dir.resolve()), str(model_dir)}, key=len, reverse=True):
            message = message.replace(path, "$BRAINCAM_MODEL_DIR")
        return message

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading finished (tests, benchmarks); True when ready."""
        self._done.wait(timeout)
        return self.ready

    def require(self) -> OnnxModel:
        model = self.model
        if model is not None:
            return model
        if self.error is not None:
            raise ModelUnavailable(
                f"the model could not be loaded: {self.error}", code="model_unavailable"
            )
        raise ModelUnavailable("the model is still loading", code="model_loading", retry_after=1)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run blocking work in the worker pool (queued while all threads are busy)."""
        if self._executor is None:
            raise ModelUnavailable("the service is not started", code="model_loading")
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._executor, functools.partial(self._in_slot, fn, *args))
        # The deadline covers the queue wait and the work (decode, inference). A thread
        # cannot be stopped: work that started finishes in the background, work still
        # queued is cancelled, and the client gets a 503 instead of waiting on.
        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(work, timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(timeout) from None

    def _in_slot(self, fn: Callable[..., T], *args: object) -> T:
        self.metrics.in_progress.inc()
        try:
            # The configured pixel budget for every decode_image call in this task.
            with pixel_budget(self.settings.max_image_pixels):
                return fn(*args)
        finally:
            self.metrics.in_progress.dec()
