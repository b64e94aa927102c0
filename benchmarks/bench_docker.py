"""The service in its container vs the same server on the host, side by side in one run.

    python -m benchmarks.bench_docker [--image PNG] [--quick] [--starts N]

Both serve the shipped demo model (models/demo) on the CPU with the service's default
settings: the container is the compose service braincam-cpu (image braincam:cpu,
built first as `make docker-images` builds it; quick when the layer cache has it),
the host server is `python -m service` of this checkout. One keep-alive client per
side (benchmarks.load.BlockingClient) times /predict and /explain through the
container's published port (127.0.0.1, through Docker's port proxy) and on the host
server's port, called in alternation request by request, so that background load
weighs on both alike; a client inside the container (`docker exec`, its own loopback:
no port proxy) then sends as many, and every answer's `timing_ms.total` (the
service's own time) separates the server's work from the way there and back. Then
cold starts of a fresh compose project: `up` -> the first /predict answer (polled
every 50 ms) and `up` -> healthy (Docker's health status). Prints a Markdown report
and writes it to benchmarks/results/<date>-<host>-docker.md.

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
from benchmarks.load import BlockingClient, fetch, multipart_request
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


# A client inside the container (`docker exec`), on its own loopback: the container
# without Docker's port proxy. Standard library only; the request comes on stdin.
INSIDE_CLIENT = """
import http.client, json, sys, time
path, n = sys.argv[1], int(sys.argv[2])
head, _, body = sys.stdin.buffer.read().partition(b"\\r\\n\\r\\n")
lines = head.decode("latin-1").split("\\r\\n")
ctype = [v for k, _, v in (x.partition(": ") for x in lines) if k.lower() == "content-type"][0]
conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=60)
out = []
for k in range(n + 3):
    t = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Content-Type": ctype})
    r = conn.getresponse()
    answer = r.read()
    if r.status != 200:
        sys.exit(f"HTTP {r.status}")
    if k >= 3:  # warm-up
        out.append([(time.perf_counter() - t) * 1000.0, json.loads(answer)["timing_ms"]["total"]])
print(json.dumps(out))
"""


def _server_ms(bodies: list[bytes]) -> list[float]:
    """The service's own time per request (`timing_ms.total`), from its answers."""
    return [float(json.loads(b)["timing_ms"]["total"]) for b in bodies]


def measure(data: bytes, requests: int, seconds: float, starts: int,
            log: Path) -> dict[str, object]:
    """Per route: the host server and the container through its published port, one
    keep-alive client each, called in alternation request by request (the order
    swapping each time) so that background load weighs on both alike; then a client
    inside the container (no port proxy) for as many requests. Client latencies and the
    service's own `timing_ms.total`."""
    tool = compose_tools()[0]
    client: dict[tuple[str, str], list[float]] = {}
    server: dict[tuple[str, str], list[float]] = {}
    with running(tool, "braincam-cpu") as project, \
            serve(MODEL_DIR.resolve(), {"BRAINCAM_PROVIDERS": "CPUExecutionProvider"}, log) as host:
        container_versions = _versions_in(project)
        sides = {"host": (host.host, host.port), "container": ("127.0.0.1", project.port)}
        for path in ("/predict", "/explain"):
            # Fresh connections per route: uvicorn closes idle keep-alive ones after 5 s.
            connections = {side: BlockingClient(*address) for side, address in sides.items()}
            try:
                bodies = {side: multipart_request(*address, path, data)
                          for side, address in sides.items()}
                for side in sides:  # warm-up
                    for _ in range(3):
                        connections[side].exchange(bodies[side])
                deadline = time.perf_counter() + seconds
                for k in range(requests):
                    if time.perf_counter() > deadline and k >= 20:
                        break
                    for side in list(sides)[:: 1 if k % 2 == 0 else -1]:
                        t = time.perf_counter()
                        status, body = connections[side].exchange(bodies[side])
                        elapsed = (time.perf_counter() - t) * 1000.0
                        if status != 200:
                            raise RuntimeError(f"{side} {path}: HTTP {status}")
                        client.setdefault((side, path), []).append(elapsed)
                        server.setdefault((side, path), []).extend(_server_ms([body]))
            finally:
                for connection in connections.values():
                    connection.close()
            n = len(client[("host", path)])
            request = multipart_request("127.0.0.1", 8000, path, data)
            inside = run(["docker", "exec", "-i", project.container("braincam-cpu"),
                          "python", "-c", INSIDE_CLIENT, path, str(n)],
                         timeout=600, input=request.decode("latin-1"), encoding="latin-1")
            if inside.returncode != 0:
                raise RuntimeError(f"client in the container: {inside.stderr[-2000:]}")
            pairs = json.loads(inside.stdout)
            client[("inside", path)] = [p[0] for p in pairs]
            server[("inside", path)] = [p[1] for p in pairs]
    starts_measured = []
    for _ in range(starts):
        project = Project(tool, ("cpu",))
        try:
            starts_measured.append(cold_start(project, data))
        finally:
            project.down()
    return {
        "compose": f"{' '.join(tool.argv)} {tool.version}",
        "timings": {f"{side} {path}": Timing.of(v) for (side, path), v in client.items()},
        "server": {f"{side} {path}": Timing.of(v) for (side, path), v in server.items()},
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
        "keep-alive connection per side, host and container called in alternation, "
        f"request by request ({timings['host /predict'].n} requests per route and side).",
        "",
        "| | Python, onnxruntime, numpy, opencv |",
        "|---|---|",
        f"| container | {versions['container']} |",
        f"| host | {versions['host']} |",
        "",
        "p50 (p95) in ms: the client's latency, and the service's own time per request",
        "(`timing_ms.total`: decode, model, encode). *container* is the user's path, a host",
        "client through the published port (Docker's port proxy); *inside* a client in the",
        "container on its own loopback (no proxy).",
        "",
        "| route | host | container | inside | container / host | inside / host "
        "| server: host | server: container |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    server = results["server"]
    assert isinstance(server, dict)
    for path in ("/predict", "/explain"):
        h, c, i = (timings[f"{side} {path}"] for side in ("host", "container", "inside"))
        sh, sc = server[f"host {path}"], server[f"container {path}"]
        lines.append(
            f"| {path} | {h.p50:.1f} ({h.p95:.1f}) | {c.p50:.1f} ({c.p95:.1f}) "
            f"| {i.p50:.1f} ({i.p95:.1f}) | **{c.p50 / h.p50:.2f}x** | {i.p50 / h.p50:.2f}x "
            f"| {sh.p50:.1f} | {sc.p50:.1f} |"
        )
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
        requests, seconds = (40, 10.0) if args.quick else (400, 60.0)
        print(f"up to {requests} requests per route and side ...", file=sys.stderr)
        results = measure(data, requests, seconds, 1 if args.quick else args.starts,
                          Path(tmp) / "host-server.log")
    report = render(results, f"{image.name} ({len(data) / 1024:.1f} KiB)", build, load_before)
    print(report)
    save_report(report, args.out, suffix="-docker")
    return 0


if __name__ == "__main__":
    sys.exit(main())

