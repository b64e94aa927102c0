"""The service in its container vs the same server on the host, side by side in one run.

    python -m benchmarks.bench_docker [--image PNG] [--quick] [--starts N]

Both serve the shipped demo model (models/demo) on the CPU with the service's default
settings: the container is the compose service braincam-cpu (image braincam:cpu,
built first as `make docker-images` builds it; quick when the layer cache has it),
the host server is `python -m service` of this checkout. One client (benchmarks.load:
one keep-alive connection, one request at a time) times /predict and /explain through
the container's published port (127.0.0.1, through Docker's port proxy) and on the
host server's port, in alternating rounds (container, host, container, ...) so that
background load hits both alike. Then cold starts of a fresh compose project: `up` ->
the first /predict answer (polled every 50 ms) and `up` -> healthy (Docker's health
status). Prints a Markdown report and writes it to benchmarks/results/<date>-<host>-docker.md.

Ratios measured in one run, never absolute gates: the container runs other versions
of Python and of some wheels (the image's) than the host, which the report lists.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.containers import (
    ROOT,
    Project,
    build_images,
    compose_tools,
    engine_info,
    run,
    running,
)
from benchmarks.load import fetch, run_load
from benchmarks.machine import load_average, machine_info
from benchmarks.report import save_report
from benchmarks.server import serve
from benchmarks.stats import Timing

MODEL_DIR = ROOT / "models" / "demo"
VERSIONS = (
    "import sys, importlib.metadata as m; "
    "print(sys.version.split()[0], m.version('onnxruntime'), m.version('numpy'), "
    "m.version('opencv-python-headless'))"
)


def default_image() -> Path:
    """The first demo test image (as `python -m benchmarks`), else the shipped example."""
    found = sorted((ROOT / "data" / "demo" / "Testing").glob("*/*.png"))
    return found[0] if found else ROOT / "examples" / "images" / "glioma.png"


def _versions_in(project: Project) -> str:
    out = project.exec("braincam-cpu", "python", "-c", VERSIONS)
    return out.stdout.strip() if out.returncode == 0 else "?"


def _host_versions() -> str:
    out = run([sys.executable, "-c", VERSIONS])
    return out.stdout.strip()


def cold_start(project: Project, data: bytes, timeout: float = 120) -> tuple[float, float]:
    """`up` of braincam-cpu -> first 200 of /predict, and -> Docker's `healthy`."""
    project.up("braincam-cpu")
    first = float("nan")
    while time.perf_counter() < project.started + timeout:
        try:
            status, _ = fetch("127.0.0.1", project.port, "/predict", data)
        except (OSError, EOFError, ValueError):
            status = 0
        if status == 200:
            first = time.perf_counter() - project.started
            break
        time.sleep(0.05)
    healthy = project.wait("braincam-cpu", "healthy", timeout, since=project.started)
    return first, healthy


def measure(data: bytes, rounds: int, requests: int, seconds: float, starts: int,
            log: Path) -> dict[str, object]:
    tool = compose_tools()[0]
    latencies: dict[tuple[str, str], list[float]] = {}
    with running(tool, "braincam-cpu") as project, \
            serve(MODEL_DIR.resolve(), {"BRAINCAM_PROVIDERS": "CPUExecutionProvider"}, log) as host:
        container_versions = _versions_in(project)
        sides = {"container": ("127.0.0.1", project.port), "host": (host.host, host.port)}
        for _ in range(rounds):
            for path in ("/predict", "/explain"):
                for side, (address, port) in sides.items():
                    result = run_load(address, port, path, data, clients=1,
                                      max_requests=requests, max_seconds=seconds, warmup=3)
                    if result.errors:
                        raise RuntimeError(f"{side} {path}: {result.errors} failed requests")
                    latencies.setdefault((side, path), []).extend(result.latencies_ms)
    starts_measured = []
    for _ in range(starts):
        project = Project(tool, ("cpu",))
        try:
            starts_measured.append(cold_start(project, data))
        finally:
            project.down()
    return {
        "compose": f"{' '.join(tool.argv)} {tool.version}",
        "timings": {f"{side} {path}": Timing.of(v) for (side, path), v in latencies.items()},
        "starts": starts_measured,
        "versions": {"container": container_versions, "host": _host_versions()},
    }


def _image_info() -> str:
    out = run(["docker", "image", "inspect", "--format", "{{.Size}}", "braincam:cpu"])
    return f"{int(out.stdout) / 1e6:.0f} MB" if out.stdout.strip().isdigit() else "?"


def render(results: dict[str, object], image_note: str, build: dict[str, float],
           load_before: str) -> str:
    timings = results["timings"]
    assert isinstance(timings, dict)
    starts = results["starts"]
    assert isinstance(starts, list)
    versions = results["versions"]
    assert isinstance(versions, dict)
    lines = [
        "# braincam: container vs host",
        "",
        f"Image {image_note}. Container: compose service braincam-cpu (braincam:cpu, "
        f"{_image_info()}), {results['compose']}; host: `python -m service` of this "
        "checkout. Same model (models/demo), CPU, the service's default settings; one "
        "client, one keep-alive connection, sequential requests, alternating rounds.",
        "",
        "| | Python, onnxruntime, numpy, opencv |",
        "|---|---|",
        f"| container | {versions['container']} |",
        f"| host | {versions['host']} |",
        "",
        "| route | container p50 ms | host p50 ms | container / host (p50) "
        "| container p95 ms | host p95 ms | n |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path in ("/predict", "/explain"):
        c, h = timings[f"container {path}"], timings[f"host {path}"]
        lines.append(f"| {path} | {c.p50:.1f} | {h.p50:.1f} | {c.p50 / h.p50:.2f}x "
                     f"| {c.p95:.1f} | {h.p95:.1f} | {c.n}/{h.n} |")
    lines += ["", "| cold start of a fresh compose project | seconds |", "|---|---:|"]
    for k, (first, healthy) in enumerate(starts, 1):
        lines.append(f"| start {k}: `up` -> first /predict answer | {first:.1f} |")
        lines.append(f"| start {k}: `up` -> healthy (probe every 5 s) | {healthy:.1f} |")
    if build:
        lines += ["", f"Image build before the run (layer cache permitting): "
                  f"{json.dumps({k: round(v) for k, v in build.items()})} s."]
    lines += ["", f"Load average before / after: {load_before} / {load_average()}.", "",
              "Machine: " + "; ".join(f"{k}: {v}" for k, v in machine_info().items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--image", type=Path,
                        help="default: the first demo test image, else examples/images/glioma.png")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--starts", type=int, default=3, help="cold starts to time (default 3)")
    parser.add_argument("--no-build", action="store_true", help="use braincam:cpu as it is")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    info, why = engine_info()
    if info is None:
        sys.exit(why)
    if not compose_tools():
        sys.exit("no Docker Compose (docker compose, or docker-compose >= 1.28)")
    image = args.image or default_image()
    data = image.read_bytes()
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        build = {} if args.no_build else build_images(("cpu",), Path(tmp))
        rounds, requests, seconds = (2, 20, 5.0) if args.quick else (4, 100, 20.0)
        print(f"{rounds} rounds of {requests} requests per route and side ...", file=sys.stderr)
        results = measure(data, rounds, requests, seconds, 1 if args.quick else args.starts,
                          Path(tmp) / "host-server.log")
    report = render(results, f"{image.name} ({len(data) / 1024:.1f} KiB)", build, load_before)
    print(report)
    save_report(report, args.out, suffix="-docker")
    return 0


if __name__ == "__main__":
    sys.exit(main())

