"""HTTP figures against real uvicorn servers on 127.0.0.1 (subprocesses).

Sequential latency of /predict and /explain (one client, keep-alive), then
closed-loop concurrency on /predict for each serving mode. Every mode has its own
server, all started up front, and the runs are interleaved (mode A, B, C, A, B,
C, ...) so that a change in background load hits every mode alike rather than
whichever happened to run last.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.load import BlockingClient, LoadResult, multipart_request, run_load
from benchmarks.server import Server, serve
from benchmarks.stats import Timing
from benchmarks.uploads import Upload

T = TypeVar("T")


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    env: dict[str, str]


def serving_modes() -> list[Mode]:
    # Default: ORT threads = cores, spinning off. The alternatives: one thread per
    # run (no intra-op parallelism), ORT's own spinning threads, micro-batching.
    return [
        Mode("batch1", "batch-1, default settings", {}),
        Mode("batch1_one_thread", "batch-1, 1 ORT thread per run",
             {"BRAINCAM_INTRA_OP_THREADS": "1"}),
        Mode("batch1_spinning", "batch-1, ORT threads spinning (ORT's default)",
             {"BRAINCAM_ORT_SPINNING": "1"}),
        Mode("batched", "micro-batching, default settings", {"BRAINCAM_BATCHING": "1"}),
    ]


@dataclass
class Concurrency:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the server process's, during the runs
    latencies_ms: list[float] = field(default_factory=list)
    batch_rows: float = 0.0
    batch_runs: float = 0.0

    def add(self, result: LoadResult, cpu_seconds: float) -> None:
        self.requests += result.requests
        self.errors += result.errors
        self.seconds += result.seconds
        self.cpu_seconds += cpu_seconds
        self.latencies_ms += result.latencies_ms

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def timing(self) -> Timing:
        return Timing.of(self.latencies_ms)

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000.0 * self.cpu_seconds / self.requests if self.requests else float("nan")

    @property
    def mean_batch(self) -> float | None:
        return self.batch_rows / self.batch_runs if self.batch_runs else None


@dataclass
class UploadFigures:
    """One upload, sequentially: the in-process work and both endpoints, interleaved."""

    upload: Upload
    raw: Timing  # decode + preprocess + classifier session.run, in this process
    predict: Timing
    explain: Timing
    server_timing: dict[str, dict[str, float]]  # path -> medians of timing_ms
    explain_bytes: int  # the default /explain response's size


@dataclass
class ServingResults:
    modes: list[Mode]
    sequential: dict[str, Timing]  # "/predict", "/explain" on the default server
    server_timing: dict[str, dict[str, float]]  # medians of the responses' timing_ms
    concurrency: dict[tuple[str, int], Concurrency]
    rss_ready_mb: dict[str, float]
    rss_peak_mb: dict[str, float]
    uploads: list[UploadFigures] = field(default_factory=list)


def measure_uploads(
    server: Server,
    uploads: list[Upload],
    raw: Callable[[bytes], object],
    rounds: int,
    per_round: int,
) -> list[UploadFigures]:
    """Raw work, /predict and /explain on each upload, one client, alternating call
    by call (raw, predict, explain, raw, ...) so that background load, on a shared
    machine, weighs on every figure of a ratio alike; the uploads take turns by round."""
    paths = ("/predict", "/explain")
    requests = {
        (u.key, path): multipart_request(server.host, server.port, path, u.data)
        for u in uploads
        for path in paths
    }
    clients = {path: BlockingClient(server.host, server.port) for path in paths}
    times: dict[tuple[str, str], list[float]] = {}
    bodies: dict[tuple[str, str], list[bytes]] = {}

    def timed(key: tuple[str, str], call: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        out = call()
        times.setdefault(key, []).append((time.perf_counter() - t0) * 1000.0)
        return out

    try:
        for r in range(rounds):
            for upload in uploads:
                if r == 0:  # first-call costs (codec set-up, arena growth): not steady state
                    raw(upload.data)
                    for path in paths:
                        clients[path].exchange(requests[(upload.key, path)])
                for _ in range(per_round):
                    timed((upload.key, "raw"), partial(raw, upload.data))
                    for path in paths:
                        exchange = partial(clients[path].exchange, requests[(upload.key, path)])
                        status, body = timed((upload.key, path), exchange)
                        if status != 200:
                            raise RuntimeError(f"{path} on {upload.key}: HTTP {status}: {body!r}")
                        bodies.setdefault((upload.key, path), []).append(body)
    finally:
        for client in clients.values():
            client.close()
    return [
        UploadFigures(
            u,
            Timing.of(times[(u.key, "raw")]),
            Timing.of(times[(u.key, "/predict")]),
            Timing.of(times[(u.key, "/explain")]),
            {path: _timing_medians(bodies[(u.key, path)]) for path in paths},
            len(bodies[(u.key, "/explain")][-1]),
        )
        for u in uploads
    ]


def _batch_counts(server: Server) -> tuple[float, float]:
    """(rows, runs) of the classifier batcher so far, from /metrics."""
    url = f"{server.url}/metrics"
    with urllib.request.urlopen(url, timeout=10) as res:
        text = res.read().decode()
    rows = runs = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("graph") == "classifier":
                if s.name == "braincam_batch_size_sum":
                    rows = s.value
                elif s.name == "braincam_batch_size_count":
                    runs = s.value
    return rows, runs


def _timing_medians(bodies: list[bytes]) -> dict[str, float]:
    timings = [json.loads(b)["timing_ms"] for b in bodies]
    return {k: statistics.median(t[k] for t in timings) for k in timings[0]} if timings else {}


def measure(
    model_dir: Path,
    data: bytes,
    clients: tuple[int, ...],
    seconds_per_run: float,
    requests_per_run: int,
    rounds: int,
    sequential_requests: int,
    log: Path,
    uploads: list[Upload] | None = None,
    raw: Callable[[bytes], object] | None = None,
    upload_rounds: int = 5,
) -> ServingResults:
    modes = serving_modes()
    with ExitStack() as stack:
        servers = {m.key: stack.enter_context(serve(model_dir, m.env, log)) for m in modes}
        rss_ready = {key: s.peak_rss_mb for key, s in servers.items()}

        default = servers["batch1"]
        sequential: dict[str, Timing] = {}
        server_timing: dict[str, dict[str, float]] = {}
        for path in ("/predict", "/explain"):
            result = run_load(
                default.host,
                default.port,
                path,
                data,
                clients=1,
                max_requests=sequential_requests,
                max_seconds=seconds_per_run * 2,
                warmup=5,
                keep_bodies=sequential_requests,
            )
            if result.errors:
                raise RuntimeError(f"{path}: {result.errors} failed requests; see {log}")
            sequential[path] = Timing.of(result.latencies_ms)
            server_timing[path] = _timing_medians(result.bodies)
        figures = []
        if uploads and raw is not None:
            per_round = max(3, sequential_requests // upload_rounds)
            figures = measure_uploads(default, uploads, raw, upload_rounds, per_round)

        concurrency = {(m.key, c): Concurrency() for m in modes for c in clients}
        for c in clients:
            for _ in range(rounds):
                for mode in modes:
                    server = servers[mode.key]
                    batched = mode.key.startswith("batched")
                    # Warm the connections and the arena for this batch size first.
                    run_load(server.host, server.port, "/predict", data, c, 2 * c, seconds_per_run)
                    before = _batch_counts(server) if batched else (0.0, 0.0)
                    cpu0 = server.cpu_seconds
                    result = run_load(
                        server.host,
                        server.port,
                        "/predict",
                        data,
                        clients=c,
                        max_requests=requests_per_run,
                        max_seconds=seconds_per_run,
                    )
                    entry = concurrency[(mode.key, c)]
                    entry.add(result, server.cpu_seconds - cpu0)
                    if batched:
                        after = _batch_counts(server)
                        entry.batch_rows += after[0] - before[0]
                        entry.batch_runs += after[1] - before[1]
        rss_peak = {key: s.peak_rss_mb for key, s in servers.items()}
    return ServingResults(
        modes, sequential, server_timing, concurrency, rss_ready, rss_peak, figures
    )
