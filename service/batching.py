"""Dynamic micro-batching: requests that arrive together run as one ONNX batch.

Each request decodes and preprocesses its own upload first (in a worker thread), so
a bad file fails alone and never reaches a batch. The tensors then queue here, on
the event loop; a waiting caller holds no thread. A batch is dispatched when it is
full (`BRAINCAM_BATCH_MAX_SIZE` rows) or when its oldest row has waited
`BRAINCAM_BATCH_MAX_WAIT_MS`, and one batch per graph runs at a time: while it
runs, the next one fills up, so under load batches form without any waiting and at
low load a request waits at most the configured delay. The ORT run itself runs
in a thread of its own (see ModelBatchers). If it fails, only the callers of that
batch get the error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Histogram

from braincam.inference import Classified, OnnxModel
from service.errors import ServiceError
from service.metrics import INFERENCE_BUCKETS, Metrics

log = logging.getLogger(__name__)

Arrays = tuple[np.ndarray, ...]
# Runs a blocking callable off the event loop (the runtime's worker pool).
PoolRunner = Callable[[Callable[[], Arrays]], Awaitable[Arrays]]

BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class InferenceFailed(ServiceError):
    """ONNX Runtime failed on a batch: a server-side error, reported without internals."""

    def __init__(self) -> None:
        super().__init__(500, "inference_failed", "inference failed; the error is logged")


class BatchMetrics:
    """Batch sizes and queue waits, registered in the app's own registry."""

    def __init__(self, metrics: Metrics) -> None:
        self.inference = metrics.inference  # one observation per batch: the ORT run
        self.size = Histogram(
            "braincam_batch_size",
            "Rows per ONNX Runtime run of the micro-batcher, by graph",
            ["graph"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=metrics.registry,
        )
        self.wait = Histogram(
            "braincam_batch_queue_seconds",
            "Time a request waited for its batch to start, by graph",
            ["graph"],
            buckets=INFERENCE_BUCKETS,
            registry=metrics.registry,
        )
        self.failures = Counter(
            "braincam_batch_failures",
            "Batches whose ONNX Runtime run failed, by graph",
            ["graph"],
            registry=metrics.registry,
        )


@dataclass
class _Pending:
    inputs: Arrays  # each [n, ...], the same n (rows this caller contributes)
    future: asyncio.Future[Arrays]
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        return int(self.inputs[0].shape[0])


class MicroBatcher:
    """Concatenates the callers' inputs along axis 0, runs `fn` once, splits the outputs.

    `fn(*inputs) -> outputs`: every input and output has the batch on axis 0.
    """

    def __init__(
        self,
        graph: str,
        fn: Callable[..., Arrays],
        run_in_pool: PoolRunner,
        metrics: BatchMetrics,
        max_size: int,
        max_wait_s: float,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self.graph = graph
        self.fn = fn
        self.run_in_pool = run_in_pool
        self.metrics = metrics
        self.max_size = max_size
        self.max_wait_s = max(0.0, max_wait_s)
        self._queue: list[_Pending] = []
        self._queued_rows = 0
        self._running = False
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, *inputs: np.ndarray) -> Arrays:
        """This caller's rows of the outputs, once its batch has run."""
        loop = asyncio.get_running_loop()
        item = _Pending(inputs, loop.create_future())
        self._queue.append(item)
        self._queued_rows += item.rows
        self._schedule(loop)
        return await item.future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._running or not self._queue:
            return  # the running batch dispatches the next one when it finishes
        if self._queued_rows >= self.max_size or self.max_wait_s == 0:
            self._dispatch(loop)
        elif self._timer is None:
            delay = self._queue[0].queued_at + self.max_wait_s - time.perf_counter()
            self._timer = loop.call_later(max(0.0, delay), self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if not self._running and self._queue:
            self._dispatch(loop)

    def _take(self) -> list[_Pending]:
        """Whole callers, oldest first, up to max_size rows (one caller always fits)."""
        taken: list[_Pending] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # cancelled while queued (client went away)
                self._queue.pop(0)
                self._queued_rows -= item.rows
                continue
            if taken and rows + item.rows > self.max_size:
                break
            taken.append(self._queue.pop(0))
            self._queued_rows -= item.rows
            rows += item.rows
        return taken

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._take()
        if not batch:
            return
        self._running = True
        # Kept referenced: the loop holds tasks only weakly.
        self._task = loop.create_task(self._run(batch))
        self._task.add_done_callback(lambda _: self._finished(loop))

    def _finished(self, loop: asyncio.AbstractEventLoop) -> None:
        self._running = False
        # Whatever queued meanwhile has waited at least one batch's run time: send
        # it now if the wait is over or the batch is full, else arm the timer.
        self._schedule(loop)

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        for item in batch:
            self.metrics.wait.labels(graph=self.graph).observe(started - item.queued_at)
        rows = [item.rows for item in batch]
        self.metrics.size.labels(graph=self.graph).observe(sum(rows))
        try:
            outputs = await self.run_in_pool(lambda: self._call(batch))
        except Exception as exc:
            self.metrics.failures.labels(graph=self.graph).inc()
            error = exc if isinstance(exc, ServiceError) else InferenceFailed()
            if not isinstance(exc, ServiceError):
                log.error("%s batch of %d rows failed", self.graph, sum(rows), exc_info=exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        except BaseException:  # cancelled (shutdown): callers must not wait forever
            for item in batch:
                if not item.future.done():
                    item.future.cancel()
            raise
        offsets = np.cumsum([0, *rows])
        for item, lo, hi in zip(batch, offsets[:-1], offsets[1:], strict=True):
            if not item.future.done():
                item.future.set_result(tuple(out[lo:hi] for out in outputs))

    def _call(self, batch: list[_Pending]) -> Arrays:
        if len(batch) == 1:
            inputs: Sequence[np.ndarray] = batch[0].inputs
        else:
            inputs = [
                np.concatenate([item.inputs[i] for item in batch])
                for i in range(len(batch[0].inputs))
            ]
        started = time.perf_counter()
        outputs = tuple(self.fn(*inputs))
        self.metrics.inference.labels(graph=self.graph).observe(time.perf_counter() - started)
        return outputs


class ModelBatchers:
    """The micro-batchers of a loaded model: the classifier runs of /predict, of OIP
    calls on the classifier and of the series routes.

    Their ORT runs have a thread of their own (one batch at a time per graph anyway),
    not the request pool: a series waits for its batches inside a pool thread, and
    batches that needed a pool thread could then wait for ever behind such callers.

    /explain is not batched: on CPU the Grad-CAM graph's cost per image does not fall
    with the batch size (`python -m benchmarks` measures it), and most of its time
    is the per-request image encoding.
    """

    def __init__(
        self,
        model: OnnxModel,
        metrics: Metrics,
        max_size: int,
        max_wait_s: float,
    ) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="braincam-batch")

        async def run_batch(fn: Callable[[], Arrays]) -> Arrays:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

        def classifier(image: np.ndarray) -> Arrays:
            out = model.classify(image)
            if out.ood_score is None:
                return (out.probabilities,)
            return (out.probabilities, out.ood_score)

        self.classifier = MicroBatcher(
            "classifier", classifier, run_batch, BatchMetrics(metrics), max_size, max_wait_s
        )

    def blocking_classify(
        self, loop: asyncio.AbstractEventLoop
    ) -> Callable[[np.ndarray], Classified]:
        """The classifier for work running in a worker thread: each call queues its
        rows with the event loop's batcher and waits for them."""

        def classify(batch: np.ndarray) -> Classified:
            future = asyncio.run_coroutine_threadsafe(self.classifier.submit(batch), loop)
            out = future.result()  # the probabilities, and the OOD score if any
            return Classified(out[0], out[1] if len(out) > 1 else None)

        return classify

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
