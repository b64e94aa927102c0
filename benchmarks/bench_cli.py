"""`python -m benchmarks.bench_cli`: `braincam predict` over a folder vs /predict over HTTP.

    python -m benchmarks.bench_cli --model-dir models/demo [--images 1000] [--rounds 3]

The same N demo PNGs (data/demo, Testing then Training) go through
  - `braincam predict DIR` as a subprocess, at --batch-size 1 and 32: images/s over
    the run (the CLI's own figure: reading, decoding, ORT, writing rows) and over the
    whole command (with interpreter start-up and model load);
  - the service's /predict, called sequentially (one keep-alive connection, one image
    per request, the next sent when the last returned) on a real uvicorn server with
    its default settings.
Rounds are interleaved and the median is reported, since the machine may be shared.
Both paths run on the CPU provider. Every HTTP answer's label is checked against the
CLI's row for the same file. Writes benchmarks/results/<date>-<host>-cli.md.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.machine import load_average, machine_info
from benchmarks.report import save_report
from benchmarks.server import Server
from braincam.model_spec import ModelSpec, load_spec
from service.local_server import serve

ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZES = (1, 32)
_RATE = re.compile(r"\(([0-9.]+) images/s")


@dataclass
class CliRun:
    batch_size: int
    run_rates: list[float] = field(default_factory=list)  # the CLI's figure, per round
    wall_rates: list[float] = field(default_factory=list)  # with start-up and model load
    cpu_ms: list[float] = field(default_factory=list)  # CPU per image, start-up excluded


def demo_images(data: Path, n: int) -> list[Path]:
    found = sorted((data / "Testing").glob("*/*.png")) + sorted((data / "Training").glob("*/*.png"))
    if len(found) < n:
        sys.exit(
            f"need {n} PNGs under {data}/Testing and Training, found {len(found)} "
            f"(build them: python -m trainer.demo_data --out {data})"
        )
    return found[:n]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def startup_cpu_s(model_dir: Path, empty: Path) -> float:
    """CPU seconds of `braincam predict` on an empty folder: interpreter, imports, model."""
    cmd = [
        sys.executable, "-m", "braincam", "predict", str(empty), "--model-dir", str(model_dir),
        "--quiet", "--providers", "CPUExecutionProvider",
    ]
    cpu = _children_cpu_s()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 1:  # 1: nothing could be read, as it should
        sys.exit(f"braincam predict on an empty folder exited {proc.returncode}:\n{proc.stderr}")
    return _children_cpu_s() - cpu


def run_cli(
    folder: Path, model_dir: Path, batch_size: int, out: Path, startup_cpu: float
) -> tuple[float, float, float]:
    """(images/s the CLI reports for its run, images/s over the whole command,
    CPU ms per image without the start-up's)."""
    cmd = [
        sys.executable, "-m", "braincam", "predict", str(folder), "--model-dir", str(model_dir),
        "--batch-size", str(batch_size), "--out", str(out), "--quiet",
        "--providers", "CPUExecutionProvider",
    ]
    started, cpu = time.perf_counter(), _children_cpu_s()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    cpu = _children_cpu_s() - cpu
    if proc.returncode != 0:
        sys.exit(f"braincam predict failed ({proc.returncode}):\n{proc.stderr}")
    match = _RATE.search(proc.stderr)
    if match is None:
        sys.exit(f"no images/s in the summary:\n{proc.stderr}")
    n = sum(1 for _ in csv.DictReader(out.open()))
    return float(match.group(1)), n / wall, 1000.0 * (cpu - startup_cpu) / n


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def run_http(server: Server, files: list[Path]) -> tuple[float, float, dict[str, str]]:
    """Sequential /predict over one keep-alive connection: (images/s, CPU ms per image
    of the server and this client together, label per file)."""
    payloads = [(str(p), *_multipart(p.read_bytes())) for p in files]  # built before timing
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    labels: dict[str, str] = {}
    started, cpu = time.perf_counter(), server.cpu_seconds + time.process_time()
    for name, body, content_type in payloads:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
        res = conn.getresponse()
        payload = res.read()
        if res.status != 200:
            sys.exit(f"/predict answered {res.status} for {name}: {payload[:300]!r}")
        labels[name] = json.loads(payload)["label"]
    seconds = time.perf_counter() - started
    cpu = server.cpu_seconds + time.process_time() - cpu
    conn.close()
    return len(payloads) / seconds, 1000.0 * cpu / len(payloads), labels


@dataclass
class CliResults:
    runs: list[CliRun]
    http_rates: list[float]
    http_cpu_ms: list[float]
    startup_cpu_s: float
    agreement: str
    seconds: float


def measure(model_dir: Path, files: list[Path], rounds: int) -> CliResults:
    """`braincam predict` at each batch size, then sequential /predict, `rounds` times."""
    started = time.perf_counter()
    runs = [CliRun(b) for b in BATCH_SIZES]
    http_rates: list[float] = []
    http_cpu_ms: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, src in enumerate(files):  # one flat folder of links to the demo images
            (folder / f"{i:05d}_{src.name}").symlink_to(src.resolve())
        log = Path(tmp) / "server.log"
        out = Path(tmp) / "rows.csv"
        http_labels: dict[str, str] = {}
        (Path(tmp) / "empty").mkdir()
        startup = statistics.median(
            startup_cpu_s(model_dir, Path(tmp) / "empty") for _ in range(3)
        )
        for round_ in range(rounds):
            for run in runs:
                print(f"round {round_ + 1}: braincam predict, batch {run.batch_size} ...",
                      file=sys.stderr)
                rate, wall, cpu_ms = run_cli(folder, model_dir, run.batch_size, out, startup)
                run.run_rates.append(rate)
                run.wall_rates.append(wall)
                run.cpu_ms.append(cpu_ms)
            print(f"round {round_ + 1}: /predict over HTTP ...", file=sys.stderr)
            try:
                # Only these settings: none of this shell's BRAINCAM_* variables.
                with serve(model_dir, {}, log, inherit_settings=False) as local:
                    server = Server(local.host, local.port, local.process)
                    rate, cpu_ms, http_labels = run_http(server, sorted(folder.iterdir()))
            except RuntimeError as exc:
                sys.exit(str(exc))
            http_rates.append(rate)
            http_cpu_ms.append(cpu_ms)
        cli_labels = {r["path"]: r["label"] for r in csv.DictReader(out.open())}  # last CLI run
        same = sum(cli_labels.get(name) == label for name, label in http_labels.items())
    agreement = f"{same} of {len(http_labels)} identical"
    seconds = time.perf_counter() - started
    return CliResults(runs, http_rates, http_cpu_ms, startup, agreement, seconds)


def table(results: CliResults) -> list[str]:
    """The comparison as Markdown lines (also a section of `python -m benchmarks --cli`)."""
    http = statistics.median(results.http_rates)
    http_cpu = statistics.median(results.http_cpu_ms)
    lines = [
        "| path | CPU ms per image | images/s (run) | images/s (whole command) "
        "| images/s vs sequential /predict |",
        "|---|---|---|---|---|",
    ]
    for run in results.runs:
        rate = statistics.median(run.run_rates)
        wall = statistics.median(run.wall_rates)
        cpu = statistics.median(run.cpu_ms)
        lines.append(
            f"| `braincam predict --batch-size {run.batch_size}` | {cpu:.2f} | {rate:.1f} "
            f"| {wall:.1f} | {rate / http:.2f}x |"
        )
    lines.append(
        f"| /predict over HTTP, sequential, keep-alive | {http_cpu:.2f} (server + client) "
        f"| {http:.1f} | - | 1.00x |"
    )
    per_round = "; ".join(
        f"batch {r.batch_size}: " + ", ".join(f"{x:.1f}" for x in r.run_rates)
        for r in results.runs
    )
    http_rounds = ", ".join(f"{x:.1f}" for x in results.http_rates)
    lines += [
        "",
        f"Medians over {len(results.http_rates)} interleaved round(s); per round: {per_round}; "
        f"HTTP: {http_rounds} images/s. \"images/s (run)\" is the CLI's own figure (reading, "
        "decoding, ORT, writing rows); \"whole command\" adds interpreter start-up and "
        "model load. CPU ms per image is user + system time of the processes doing the "
        "work; for the CLI without its start-up (imports and model load: "
        f"{results.startup_cpu_s:.2f} s of CPU, measured on an empty folder). On a shared "
        "machine it is the steadier figure: images/s follows the share of the cores the "
        "scheduler gives each process.",
        "",
        f"Labels, CLI vs HTTP: {results.agreement}.",
    ]
    return lines


def setup_notes(spec: ModelSpec, files: list[Path], data: Path) -> dict[str, str]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": f"{spec.name} v{spec.version}, input {spec.input_shape}, "
        f"{len(spec.labels)} classes",
        "images": f"{len(files)} demo PNGs from {data}",
        "ORT": f"CPUExecutionProvider, one intra-op thread per usable core ({usable}), "
        "spinning off: the CLI's and the service's defaults",
        "HTTP": "uvicorn on 127.0.0.1 with default settings (no micro-batching), "
        "http.client in this process",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/demo"))
    p.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    spec = load_spec(args.model_dir)
    files = demo_images(args.data, args.images)
    machine = machine_info()
    results = measure(args.model_dir, files, args.rounds)
    setup = setup_notes(spec, files, args.data)
    setup["wall time"] = f"{results.seconds:.0f} s"
    lines = ["# braincam predict vs /predict", ""]
    lines += [f"- **{k}**: {v}" for k, v in {**machine, **setup}.items()]
    lines += ["", *table(results), "", f"Load average at the end: {load_average()}.", ""]
    report = "\n".join(lines)
    print(report)
    save_report(report, args.out, "-cli")
    return 0


if __name__ == "__main__":
    sys.exit(main())
