"""The Markdown report: machine, latency tables, concurrency, memory, goals."""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.serving import ServingResults, UploadFigures
from benchmarks.stats import Timing

RSS_GOAL_MB = 400.0


@dataclass(frozen=True)
class Goal:
    name: str
    measured: str
    target: str
    met: bool


def _ms(t: Timing | None) -> tuple[str, str]:
    if t is None:
        return "n/a", "n/a"
    return f"{t.p50:.2f}", f"{t.p95:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def goals(
    direct: dict[str, Timing],
    keras: dict[str, Timing],
    serving: ServingResults | None,
    top_clients: int,
) -> list[Goal]:
    out: list[Goal] = []
    if serving is not None and serving.uploads:
        # Each upload's three figures were measured interleaved (serving.measure_uploads).
        for f in serving.uploads:
            predict, explain, raw = f.predict.p50, f.explain.p50, server_work(f)
            out.append(
                Goal(
                    f"{f.upload.key}: /predict p50 vs its decode + preprocess + session.run",
                    f"{predict / raw:.2f}x ({predict:.2f} vs {raw:.2f} ms)",
                    "<= 1.5x",
                    predict <= 1.5 * raw,
                )
            )
            out.append(
                Goal(
                    f"{f.upload.key}: /explain p50 vs /predict p50 (default response)",
                    f"{explain / predict:.2f}x ({explain:.2f} vs {predict:.2f} ms)",
                    "<= 1.3x",
                    explain <= 1.3 * predict,
                )
            )
    elif serving is not None:
        predict = serving.sequential["/predict"].p50
        explain = serving.sequential["/explain"].p50
        base = direct["ort_classifier@1"].p50 + direct["decode@1"].p50
        out.append(
            Goal(
                "/predict p50 vs session.run + decode",
                f"{predict / base:.2f}x ({predict:.2f} vs {base:.2f} ms)",
                "<= 1.5x",
                predict <= 1.5 * base,
            )
        )
        out.append(
            Goal(
                "/explain p50 vs /predict p50",
                f"{explain / predict:.2f}x ({explain:.2f} vs {predict:.2f} ms)",
                "<= 1.3x",
                explain <= 1.3 * predict,
            )
        )
    if keras:
        k = keras["keras_predict@1"].p50 + keras["keras_gradient_tape@1"].p50
        o = direct["ort_gradcam@1"].p50  # prediction and map from one run
        out.append(
            Goal(
                "Keras predict + GradientTape vs ORT Grad-CAM graph + CAM (batch 1)",
                f"{k / o:.1f}x ({k:.1f} vs {o:.2f} ms)",
                ">= 10x",
                k >= 10 * o,
            )
        )
    if serving is not None and serving.modes:
        # Best against best: a badly tuned batch-1 baseline would flatter batching.
        best = {
            kind: max(
                (serving.concurrency[(m.key, top_clients)].throughput, m.label)
                for m in serving.modes
                if m.key.startswith("batched") == (kind == "on")
            )
            for kind in ("on", "off")
        }
        (on, on_label), (off, off_label) = best["on"], best["off"]
        ratio = on / off if off else math.nan
        out.append(
            Goal(
                f"micro-batching vs batch-1 throughput at {top_clients} clients (best modes)",
                f"{ratio:.2f}x ({on:.0f} req/s, {on_label} vs {off:.0f}, {off_label})",
                ">= 2x",
                ratio >= 2,
            )
        )
        peak = max(serving.rss_peak_mb.values())
        out.append(
            Goal(
                "serving peak RSS (VmHWM), worst mode",
                f"{peak:.0f} MB",
                f"<= {RSS_GOAL_MB:.0f} MB",
                peak <= RSS_GOAL_MB,
            )
        )
    return out


def server_work(f: UploadFigures) -> float:
    """/predict's raw work as the server timed it in the same requests (medians of
    timing_ms): decode + preprocess + session.run, without HTTP, multipart and JSON.
    On a loaded machine this is the fair baseline: the in-process `raw` column runs
    in another process, whose ORT threads the scheduler treats differently."""
    t = f.server_timing.get("/predict", {})
    return sum(t.get(k, math.nan) for k in ("decode", "preprocess", "inference"))


def batching_bound(
    direct: dict[str, Timing], serving: ServingResults, top_clients: int
) -> list[str]:
    """What batching could gain at most here: only the ORT run's per-image cost falls
    with the batch; HTTP, multipart, decoding and JSON are paid per request."""
    one, sixteen = direct.get("ort_classifier@1"), direct.get("ort_classifier@16")
    unbatched = [
        serving.concurrency[(m.key, top_clients)]
        for m in serving.modes
        if not m.key.startswith("batched")
    ]
    if one is None or sixteen is None or not unbatched:
        return []
    best = max(unbatched, key=lambda c: c.throughput)
    cpu = best.cpu_ms_per_request
    saved = one.p50 - sixteen.p50 / 16
    bound = cpu / max(cpu - saved, 1e-9)
    return [
        f"Batching's ceiling on this machine: a batch of 16 saves {saved:.2f} ms of ORT "
        f"time per image ({one.p50:.2f} ms at batch 1, {sixteen.p50 / 16:.2f} ms per image "
        f"at 16), against {cpu:.2f} ms of server CPU per request in the best batch-1 mode "
        f"at {top_clients} clients: at most {bound:.2f}x the throughput, however the "
        "batches form. Hence `BRAINCAM_BATCHING=auto` leaves it off on the CPU provider."
    ]


def upload_section(serving: ServingResults) -> list[str]:
    """Per upload: raw work, both endpoints (p50 ms) and where /explain's time goes."""
    lines = [
        "## Uploads of the sizes users send (1 client, keep-alive, interleaved rounds)",
        "",
        "work = decode + preprocess + classifier `session.run` as the server timed them "
        "in the same /predict requests (medians of `timing_ms`); raw = the same work "
        "called in the benchmark process. Calls alternate raw, /predict, /explain. "
        "/explain returns its default response (the overlay as PNG).",
        "",
    ]
    rows = []
    for f in serving.uploads:
        server = f.server_timing.get("/explain", {})
        pred = f.server_timing.get("/predict", {})
        rows.append(
            [
                f.upload.key,
                f.upload.note,
                f"{f.raw.p50:.2f}",
                f"{server_work(f):.2f}",
                f"{f.predict.p50:.2f}",
                f"{f.predict.p50 / server_work(f):.2f}x",
                f"{f.explain.p50:.2f}",
                f"{f.explain.p50 / f.predict.p50:.2f}x",
                f"{pred.get('total', math.nan):.2f}",
                ", ".join(
                    f"{k} {server[k]:.2f}"
                    for k in ("decode", "preprocess", "inference", "cam", "encode", "total")
                    if k in server
                ),
                f"{f.explain_bytes / 1024:.0f}",
                str(f.predict.n),
            ]
        )
    return lines + _table(
        [
            "upload",
            "what",
            "raw p50",
            "work",
            "/predict p50",
            "vs work",
            "/explain p50",
            "vs /predict",
            "/predict server total",
            "/explain server timing_ms",
            "/explain KiB",
            "requests",
        ],
        rows,
    )


def render(
    title: str,
    machine: dict[str, str],
    setup: dict[str, str],
    direct: dict[str, Timing],
    keras: dict[str, Timing],
    keras_note: str | None,
    serving: ServingResults | None,
    clients: tuple[int, ...],
    load_after: str,
) -> str:
    lines = [f"# {title}", ""]
    lines += _table(
        ["", ""], [[k, v] for k, v in {**machine, "load average at the end": load_after}.items()]
    )
    lines += ["", *(f"- {k}: {v}" for k, v in setup.items()), ""]

    def latency_table(rows_of: tuple[tuple[str, str], ...], path: str) -> list[str]:
        """Direct/Keras rows at batch 1 and 16, then the HTTP endpoint at batch 1."""
        rows = []
        for what, key in rows_of:
            for n in (1, 16):
                t = direct.get(f"{key}@{n}") or keras.get(f"{key}@{n}")
                if t is not None:
                    rows.append([what, str(n), *_ms(t), str(t.n)])
        if serving is not None:
            http = serving.sequential[path]
            rows.append(
                [f"HTTP `POST {path}` (loopback, 1 client)", "1", *_ms(http), str(http.n)]
            )
        return _table(["what", "batch", "p50 ms", "p95 ms", "runs"], rows)

    lines += ["## Classification (ms per call; batch 16 = one call on 16 images)", ""]
    lines += latency_table(
        (
            ("decode (PNG bytes -> pixels)", "decode"),
            ("decode + preprocess", "decode+preprocess"),
            ("ORT classifier `session.run`", "ort_classifier"),
            ("Keras `model.predict`", "keras_predict"),
            ("Keras model in a `tf.function`", "keras_tf_function"),
        ),
        "/predict",
    )
    lines += ["", "## Explanation (Grad-CAM, prediction included)", ""]
    lines += latency_table(
        (
            ("Keras GradientTape + Grad-CAM in numpy", "keras_gradient_tape"),
            ("ORT Grad-CAM graph + Grad-CAM in numpy", "ort_gradcam"),
        ),
        "/explain",
    )
    if keras_note:
        lines += ["", f"Keras rows skipped: {keras_note}"]

    if serving is not None:
        lines += ["", "Where the server's time goes (medians of the responses' `timing_ms`):", ""]
        for path, medians in serving.server_timing.items():
            lines.append(f"- `{path}`: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))

        if serving.uploads:
            lines += ["", *upload_section(serving)]

        lines += ["", "## Concurrency: `POST /predict`, closed loop", ""]
        rows = []
        for c in clients:
            for mode in serving.modes:
                r = serving.concurrency[(mode.key, c)]
                t = r.timing
                mean = r.mean_batch
                rows.append(
                    [
                        str(c),
                        mode.label,
                        f"{r.throughput:.0f}",
                        f"{t.p50:.1f}",
                        f"{t.p95:.1f}",
                        f"{r.cpu_ms_per_request:.2f}",
                        "" if mean is None else f"{mean:.1f}",
                        str(r.requests),
                        str(r.errors),
                    ]
                )
        lines += _table(
            [
                "clients",
                "mode",
                "req/s",
                "p50 ms",
                "p95 ms",
                "server CPU ms/req",
                "mean batch",
                "requests",
                "errors",
            ],
            rows,
        )

        lines += ["", *batching_bound(direct, serving, max(clients))]

        lines += ["", "## Memory: serving process RSS (MB)", ""]
        lines += _table(
            ["mode", "after start-up (VmHWM)", "peak after all runs (VmHWM)"],
            [
                [m.label, f"{serving.rss_ready_mb[m.key]:.0f}", f"{serving.rss_peak_mb[m.key]:.0f}"]
                for m in serving.modes
            ],
        )

    lines += ["", "## Goals", ""]
    lines += _table(
        ["goal", "measured", "target", "met"],
        [
            [g.name, g.measured, g.target, "yes" if g.met else "**no**"]
            for g in goals(direct, keras, serving, max(clients))
        ],
    )
    return "\n".join(lines) + "\n"


def save_report(report: str, out_dir: Path, suffix: str = "") -> Path:
    """benchmarks/results/<timestamp>-<host><suffix>.md; says where on stderr."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out_dir / f"{stamp}-{socket.gethostname()}{suffix}.md"
    target.write_text(report)
    print(f"written to {os.path.relpath(target)}", file=sys.stderr)
    return target
