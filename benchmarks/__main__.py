"""`python -m benchmarks`: every performance figure of the project, side by side, in one run.

    python -m benchmarks --model-dir models/demo [--quick] [--no-keras] [--no-http] [--cli]

Same model, same image (the first demo test image unless --image), medians and
p95 over repeated runs, each measurement bounded in count and in time (the full
run takes 3-5 minutes on two cores). Prints a Markdown report and writes it to
benchmarks/results/<date>-<host>.md. The HTTP figures come from real uvicorn
servers on 127.0.0.1, and the load generator runs on the same machine: on a small
machine it competes with the server for the cores, which the report's server-CPU
column makes visible.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2

from benchmarks import direct, serving
from benchmarks.machine import load_average, machine_info
from benchmarks.report import render, save_report
from benchmarks.stats import Timing
from benchmarks.uploads import benchmark_uploads
from braincam.decoding import decode_image
from braincam.inference import OnnxModel
from service.core.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def _image(path: Path | None, size: int | None) -> tuple[bytes, str]:
    if path is None:
        found = sorted((ROOT / "data" / "demo" / "Testing").glob("*/*.png"))
        if not found:
            sys.exit("no demo test images in data/demo/Testing: pass --image")
        path = found[0]
    data = path.read_bytes()
    if size is not None:
        pixels = cv2.resize(decode_image(data).pixels, (size, size), interpolation=cv2.INTER_LINEAR)
        ok, buf = cv2.imencode(".png", pixels)
        assert ok
        data = buf.tobytes()
    decoded = decode_image(data)
    width, height = decoded.size
    return data, f"{path.name}: {width}x{height} {decoded.format}, {len(data) / 1024:.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/demo"))
    p.add_argument("--keras", type=Path, help="Keras model (default runs/<name>/model.keras)")
    p.add_argument("--image", type=Path, help="default: the first demo test image")
    p.add_argument("--size", type=int, help="resize the image to SIZE x SIZE first")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--no-keras", action="store_true", help="skip the Keras rows")
    p.add_argument("--no-http", action="store_true", help="skip the server figures")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    p.add_argument("--no-sizes", action="store_true",
                   help="skip the 512/1024 PNG, JPEG and DICOM uploads (benchmarks/uploads.py)")
    p.add_argument(
        "--cli", action="store_true",
        help="also `braincam predict` on 1,000 demo PNGs vs sequential /predict (bench_cli)",
    )
    args = p.parse_args(argv)

    quick = args.quick
    repeats, budget = (10, 1.0) if quick else (60, 4.0)
    clients = tuple(int(c) for c in args.clients.split(","))
    data, image_note = _image(args.image, args.size)
    machine = machine_info()
    started = time.perf_counter()

    # The service's own session settings (ORT threads, spinning): what it runs.
    settings = Settings()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = (f"{settings.intra_op_threads}" if settings.intra_op_threads
               else f"{usable} (ORT's default: one per core)")
    model = OnnxModel(
        args.model_dir,
        providers=["CPUExecutionProvider"],
        intra_op_threads=settings.intra_op_threads or None,
        allow_spinning=settings.ort_spinning,
    )
    model.warmup()
    spec = model.spec
    print(f"direct ORT figures ({image_note}) ...", file=sys.stderr)
    direct_rows = direct.measure(model, data, repeats, budget)
    uploads = [] if args.no_sizes else benchmark_uploads(data)
    raw = partial(direct.raw_predict, model)

    results: serving.ServingResults | None = None
    seconds_per_run = 1.5 if quick else 5.0
    if not args.no_http:
        print("HTTP figures (uvicorn subprocesses) ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "server.log"
            try:
                results = serving.measure(
                    args.model_dir.resolve(),
                    data,
                    clients,
                    seconds_per_run=seconds_per_run,
                    requests_per_run=300 if quick else 3000,
                    rounds=1 if quick else 2,
                    sequential_requests=30 if quick else 300,
                    log=log,
                    uploads=uploads,
                    raw=raw,
                    upload_rounds=2 if quick else 5,
                )
            except RuntimeError as exc:
                sys.stderr.write(log.read_text() if log.exists() else "")
                sys.exit(str(exc))

    del raw, model  # the Keras figures need the cores and the memory
    keras_rows: dict[str, Timing] = {}
    keras_note: str | None = None
    keras_path = args.keras or ROOT / "runs" / spec.name / "model.keras"
    if args.no_keras:
        keras_note = "--no-keras"
    elif not keras_path.is_file():
        keras_note = f"no Keras model at {keras_path} (pass --keras)"
    else:
        try:
            from benchmarks import keras_side
        except ImportError as exc:  # the `train` extra is not installed
            keras_note = f"TensorFlow is not installed ({exc})"
        else:
            print("Keras figures ...", file=sys.stderr)
            keras_rows = keras_side.measure(
                keras_path, spec, data, 10 if quick else 30, 2.0 if quick else 6.0
            )

    cli_section: list[str] = []
    if args.cli:
        from benchmarks import bench_cli

        print("braincam predict vs /predict ...", file=sys.stderr)
        files = bench_cli.demo_images(ROOT / "data" / "demo", 200 if quick else 1000)
        cli_results = bench_cli.measure(args.model_dir, files, rounds=1)
        cli_section = ["", f"## braincam predict vs sequential /predict ({len(files)} demo PNGs)",
                       "", *bench_cli.table(cli_results), ""]

    setup = {
        "model": f"{spec.name} v{spec.version}, input {spec.input_shape}, "
        f"{len(spec.labels)} classes, explained layer {spec.explanation.layer}",
        "image": image_note,
        "ORT": f"CPUExecutionProvider, {threads} intra-op thread(s), spinning "
        f"{'on' if settings.ort_spinning else 'off'}: the service's settings",
        "HTTP": f"uvicorn on 127.0.0.1, keep-alive raw-socket client in this process; "
        f"concurrency runs {seconds_per_run:.0f} s or "
        f"{300 if quick else 3000} requests each, {1 if quick else 2} interleaved round(s)",
        "wall time": f"{time.perf_counter() - started:.0f} s",
    }
    report = render(
        "braincam benchmarks" + (" (quick)" if quick else ""),
        machine,
        setup,
        direct_rows,
        keras_rows,
        keras_note,
        results,
        clients,
        load_average(),
    )
    report += "\n".join(cli_section)
    print(report)
    save_report(report, args.out, "-quick" if quick else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
