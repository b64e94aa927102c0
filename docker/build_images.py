"""Build braincam's images on any Docker engine: `make docker-images`.

    python3 docker/build_images.py [--target cpu|gpu|train|orthanc ...] [--base auto|official|local]

Builds braincam:cpu, braincam:gpu, braincam:train and the PACS image of the compose
`pacs` profile (braincam-orthanc:bookworm) with BuildKit, in parallel. Standard
library only: it runs before any virtualenv exists.

The base image. Every Dockerfile starts from PYTHON_IMAGE (the official Python image,
a Debian bookworm slim image). Where the engine has it or can pull it, it is used
unchanged. Where it cannot (an engine without registry access), an equivalent base
is built locally from Debian's packages: mmdebstrap makes a minimal root file system
of the same Debian release with python3 and python3-venv (Debian's Python 3.11),
`docker import` turns it into the image braincam-base:<release>, and the builds get
it as --build-arg PYTHON_IMAGE. It is rebuilt only when its recipe changes (a label
records the recipe's hash). --base official / local forces one or the other;
a PYTHON_IMAGE set in the environment is used as given.

pip inside the builds: the CA bundle the host's pip is configured with (PIP_CERT, or
pip's `global.cert`) goes in as the BuildKit secret `pip_cert` (never into a layer),
so pip works behind a TLS-inspecting proxy that the host trusts.

BuildKit: `docker build` is BuildKit where the buildx plugin is installed; without
it, a Docker CLI older than 23 (e.g. Debian's docker.io) builds with DOCKER_BUILDKIT=1.

Environment passed through as build arguments when set: ORT_SPEC, MODEL_DIR, MODEL_NAME.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
ORTHANC_DIR = ROOT / "docker" / "orthanc"
PASSED_THROUGH = ("ORT_SPEC", "MODEL_DIR", "MODEL_NAME")
RECIPE_LABEL = "org.braincam.base.recipe"


@dataclass(frozen=True)
class Target:
    name: str
    tag: str
    dockerfile: Path
    context: Path
    stage: str | None  # --target; None: the Dockerfile's last stage


TARGETS = {
    "cpu": Target("cpu", "braincam:cpu", DOCKERFILE, ROOT, "cpu"),
    "gpu": Target("gpu", "braincam:gpu", DOCKERFILE, ROOT, "gpu"),
    "train": Target("train", "braincam:train", DOCKERFILE, ROOT, "train"),
    "orthanc": Target(
        "orthanc", "braincam-orthanc:bookworm", ORTHANC_DIR / "Dockerfile", ORTHANC_DIR, None
    ),
}

# The local base: what the official python:*-slim-<release> image holds that the
# builds rely on (python, venv, CA certificates, /etc/services, time zones), from
# Debian's packages. Docs, man pages and translations are left out as in Debian's
# slim images; policy-rc.d keeps package scripts from starting services in a build.
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "netbase",
                 "tzdata")
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
POLICY_RC_D = (
    "printf '#!/bin/sh\\nexit 101\\n' > \"$1/usr/sbin/policy-rc.d\""
    " && chmod 0755 \"$1/usr/sbin/policy-rc.d\""
)
IMAGE_CONFIG = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)

_print_lock = threading.Lock()


def say(message: str) -> None:
    with _print_lock:
        print(message, flush=True)


class BuildError(RuntimeError):
    pass


def run(
    argv: Sequence[str], timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


# ------------------------------------------------------------------ docker CLIs


def _docker_executables() -> list[str]:
    """Every `docker` on PATH, first one first, each file once."""
    found: list[str] = []
    seen: set[str] = set()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder or ".") / "docker"
        if path.is_file() and os.access(path, os.X_OK):
            real = str(path.resolve())
            if real not in seen:
                seen.add(real)
                found.append(str(path))
    return found


def buildkit_cli() -> tuple[str, dict[str, str]]:
    """A docker CLI whose `docker build` is BuildKit, and the environment it needs."""
    candidates = _docker_executables()
    if not candidates:
        raise BuildError("no `docker` command on PATH")
    versions = {}
    for docker in candidates:
        if run([docker, "buildx", "version"], timeout=30).returncode == 0:
            return docker, {}
        out = run([docker, "version", "--format", "{{.Client.Version}}"], timeout=30).stdout
        versions[docker] = out.strip() or "?"
        match = re.match(r"(\d+)\.", out.strip())
        if match and int(match.group(1)) < 23:
            # CLIs before 23 carry their own BuildKit client (no buildx needed).
            return docker, {"DOCKER_BUILDKIT": "1"}
    raise BuildError(
        "no BuildKit builder: the Docker CLI(s) found ("
        + ", ".join(f"{d} {v}" for d, v in versions.items())
        + ") lack the buildx plugin; install docker-buildx (or Docker's docker-buildx-plugin)"
    )


def docker() -> str:
    found = _docker_executables()
    if not found:
        raise BuildError("no `docker` command on PATH")
    return found[0]


def image_exists(image: str) -> bool:
    return run([docker(), "image", "inspect", image], timeout=60).returncode == 0


def image_label(image: str, label: str) -> str | None:
    result = run([docker(), "image", "inspect", "--format", "{{json .Config.Labels}}", image])
    if result.returncode != 0:
        return None
    labels = json.loads(result.stdout or "null") or {}
    return labels.get(label)


def image_size_mb(image: str) -> float:
    out = run([docker(), "image", "inspect", "--format", "{{.Size}}", image]).stdout.strip()
    return int(out) / 1e6 if out.isdigit() else float("nan")


# --------------------------------------------------------------------- the base


def dockerfile_default(name: str, dockerfile: Path = DOCKERFILE) -> str:
    match = re.search(rf"^ARG {name}=\"?([^\"\n]+)\"?$", dockerfile.read_text(), re.MULTILINE)
    if not match:
        raise BuildError(f"{dockerfile} has no default for ARG {name}")
    return match.group(1)


def debian_release(image: str) -> str:
    """The Debian release an official image is built on: python:3.12.12-slim-bookworm."""
    match = re.search(r"-(bookworm|trixie|bullseye|forky)$", image)
    if not match:
        raise BuildError(f"cannot tell the Debian release of {image} (want a -<release> tag)")
    return match.group(1)


def try_pull(image: str) -> tuple[bool, str]:
    try:
        result = run([docker(), "pull", "--quiet", image], timeout=900)
    except subprocess.TimeoutExpired:
        return False, "docker pull timed out"
    message = (result.stderr or result.stdout).strip().splitlines()
    return result.returncode == 0, message[-1] if message else ""


def mmdebstrap_argv(release: str) -> list[str]:
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        f"--include={','.join(BASE_PACKAGES)}",
        # merged /usr by symlinks, as debootstrap does: no usrmerge package (and no perl)
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--aptopt=Acquire::Retries \"3\"",
        "--aptopt=APT::Install-Recommends \"false\"",
        *(f"--dpkgopt={rule}" for rule in DPKG_EXCLUDES),
        f"--customize-hook={POLICY_RC_D}",
        release,
        "-",  # a tarball on stdout
    ]
    return argv


def recipe_hash(release: str) -> str:
    recipe = json.dumps([mmdebstrap_argv(release), IMAGE_CONFIG])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def ensure_mmdebstrap() -> None:
    if shutil.which("mmdebstrap"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BuildError(
            "the engine cannot pull the base image, and building one locally needs mmdebstrap: "
            "sudo apt-get install mmdebstrap"
        )
    say("installing mmdebstrap (Debian package) to build the base image locally ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "mmdebstrap"]):
        result = run(argv, timeout=900, env=env)
        if result.returncode != 0 and "install" in argv:
            raise BuildError(f"{' '.join(argv)} failed:\n{result.stderr[-2000:]}")


def build_local_base(release: str) -> str:
    """braincam-base:<release> from Debian's packages, unless it is up to date."""
    tag = f"braincam-base:{release}"
    digest = recipe_hash(release)
    if image_label(tag, RECIPE_LABEL) == digest:
        say(f"base: {tag} (built locally from Debian {release}, up to date)")
        return tag
    ensure_mmdebstrap()
    say(f"base: building {tag} from Debian {release}'s packages (mmdebstrap | docker import) ...")
    started = time.perf_counter()
    changes = [*IMAGE_CONFIG, f"LABEL {RECIPE_LABEL}={digest}"]
    import_argv = [docker(), "import", *(f"--change={c}" for c in changes), "-", tag]
    with tempfile.TemporaryFile() as log:
        strap = subprocess.Popen(mmdebstrap_argv(release), stdout=subprocess.PIPE, stderr=log)
        assert strap.stdout is not None
        imported = subprocess.run(import_argv, stdin=strap.stdout, capture_output=True,
                                  text=True, check=False)
        strap.stdout.close()
        strap.wait()
        if strap.returncode != 0 or imported.returncode != 0:
            log.seek(0)
            raise BuildError(
                f"building {tag} failed (mmdebstrap exit {strap.returncode}, docker import "
                f"exit {imported.returncode}):\n{log.read().decode(errors='replace')[-3000:]}"
                f"{imported.stderr[-1000:]}"
            )
    say(f"base: {tag} built in {time.perf_counter() - started:.0f} s "
        f"({image_size_mb(tag):.0f} MB)")
    return tag


def resolve_base(mode: str) -> str:
    """The image every build starts from (the value of PYTHON_IMAGE)."""
    given = os.environ.get("PYTHON_IMAGE")
    if given:
        if not image_exists(given):
            pulled, why = try_pull(given)
            if not pulled:
                raise BuildError(f"PYTHON_IMAGE={given} is not on this engine and cannot be "
                                 f"pulled: {why}")
        say(f"base: {given} (PYTHON_IMAGE)")
        return given
    official = dockerfile_default("PYTHON_IMAGE")
    release = debian_release(official)
    if mode == "local":
        return build_local_base(release)
    if image_exists(official):
        say(f"base: {official} (official, present)")
        return official
    pulled, why = try_pull(official)
    if pulled:
        say(f"base: {official} (official, pulled)")
        return official
    if mode == "official":
        raise BuildError(f"cannot pull {official}: {why}")
    say(f"base: cannot pull {official} ({why}): building an equivalent locally")
    return build_local_base(release)


# ------------------------------------------------------------------------ builds


def pip_cert() -> str | None:
    """The CA bundle the host's pip trusts: PIP_CERT, else pip's configured `global.cert`."""
    path = os.environ.get("PIP_CERT")
    if not path:
        for python in (sys.executable, "python3"):
            try:
                out = run([python, "-m", "pip", "config", "get", "global.cert"], timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if out.returncode == 0 and out.stdout.strip():
                path = out.stdout.strip()
                break
    return path if path and Path(path).is_file() else None


def build_argv(target: Target, cli: str, base: str, cert: str | None) -> list[str]:
    argv = [cli, "build", "--progress=plain", "-t", target.tag, "-f", str(target.dockerfile),
            "--build-arg", f"PYTHON_IMAGE={base}"]
    if target.stage:
        argv += ["--target", target.stage]
    if target.dockerfile == DOCKERFILE:
        argv += [a for name in PASSED_THROUGH if os.environ.get(name)
                 for a in ("--build-arg", f"{name}={os.environ[name]}")]
    if cert:
        argv += ["--secret", f"id=pip_cert,src={cert}"]
    return [*argv, str(target.context)]


# BuildKit loses a build's client session now and then on a loaded machine (the step
# that mounts the secret then fails); the next attempt resumes from the layer cache.
TRANSIENT = re.compile(r"no active session for \S+: context deadline exceeded")
ATTEMPTS = 3


def build_one(target: Target, cli: str, env: dict[str, str], base: str, cert: str | None,
              log_dir: Path) -> float:
    log_path = log_dir / f"{target.name}.log"
    say(f"{target.tag}: building (log: {log_path}) ...")
    started = time.perf_counter()
    log_path.write_text("")
    for attempt in range(1, ATTEMPTS + 1):
        with log_path.open("a") as log:
            result = subprocess.run(build_argv(target, cli, base, cert), stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, **env},
                                    check=False)
        text = log_path.read_text(errors="replace")
        if result.returncode == 0 or attempt == ATTEMPTS or not TRANSIENT.search(text[-5000:]):
            break
        say(f"{target.tag}: BuildKit lost the build's session; again from the cache "
            f"(attempt {attempt + 1} of {ATTEMPTS})")
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        tail = "\n".join(text.splitlines()[-60:])
        raise BuildError(f"{target.tag}: docker build failed after {seconds:.0f} s:\n{tail}")
    say(f"{target.tag}: built in {seconds:.0f} s ({image_size_mb(target.tag):.0f} MB)")
    return seconds


LOCK = Path(tempfile.gettempdir()) / "braincam-build-images.lock"


def build(targets: Sequence[str], base_mode: str = "auto", jobs: int = 3,
          log_dir: Path | None = None) -> dict[str, float]:
    """Build the named targets; returns seconds per target (and `base`, `total`).
    One run at a time on this machine (a lock file): a second one waits, then finds
    the layers in the cache."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise BuildError(f"unknown target(s) {sorted(unknown)}: choose from {sorted(TARGETS)}")
    with LOCK.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another image build is running ({LOCK}): waiting for it ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(targets, base_mode, jobs, log_dir)


def _build(targets: Sequence[str], base_mode: str, jobs: int,
           log_dir: Path | None) -> dict[str, float]:
    cli, env = buildkit_cli()
    started = time.perf_counter()
    base = resolve_base(base_mode)
    timings = {"base": time.perf_counter() - started}
    cert = pip_cert()
    say(f"pip in the builds trusts {cert} (build secret)" if cert
        else "pip in the builds uses its own CA bundle (no PIP_CERT / pip global.cert)")
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="braincam-build-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {
            name: pool.submit(build_one, TARGETS[name], cli, env, base, cert, log_dir)
            for name in dict.fromkeys(targets)
        }
        errors = []
        for name, future in futures.items():
            try:
                timings[name] = future.result()
            except BuildError as exc:
                errors.append(str(exc))
    if errors:
        raise BuildError("\n\n".join(errors))
    timings["total"] = time.perf_counter() - started
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--target", action="append", choices=sorted(TARGETS),
                        help="build only these (repeatable); default: all")
    parser.add_argument("--base", choices=("auto", "official", "local"), default="auto",
                        help="auto: the official image where the engine has or can pull it")
    parser.add_argument("--jobs", type=int, default=3, help="builds in parallel (default 3)")
    parser.add_argument("--log-dir", type=Path, help="where each build's log goes")
    parser.add_argument("--timings", type=Path, help="write the seconds per step as JSON")
    args = parser.parse_args(argv)
    targets = args.target or ["cpu", "gpu", "train", "orthanc"]
    try:
        timings = build(targets, args.base, args.jobs, args.log_dir)
    except BuildError as exc:
        print(f"build_images: {exc}", file=sys.stderr)
        return 1
    if args.timings:
        args.timings.write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}))
    say(f"done in {timings['total']:.0f} s: " + ", ".join(TARGETS[t].tag for t in targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
