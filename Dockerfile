# braincam images: the inference service on ONNX Runtime, GPU (default) or CPU,
# plus a training image. See docs/docker.md.
#
#   docker build -t braincam:gpu .                    # last stage = `gpu` (CUDA EP)
#   docker build --target cpu -t braincam:cpu .        # CPU only, slim
#   docker build --target train -t braincam:train .    # trainer + exporter (TensorFlow, CPU)
#
# Stages: model (the model directory to bake in, from the build context),
#         cpu-venv -> cpu, gpu-venv -> gpu, and train (not on the runtime path).
# The runtime stages (cpu, gpu) get a ready virtualenv and the model copied in:
# no TensorFlow, no compilers, no pip builds there, and nothing is trained while
# an image is built. The default model is the demo model shipped in the repository
# (models/demo; `make model` rebuilds it). Another exported model directory:
#   docker build --build-arg MODEL_DIR=models/mymodel --build-arg MODEL_NAME=mymodel .
# (MODEL_DIR must be let through .dockerignore), or one outside the context:
#   docker build --build-context model=/path/to/mymodel --build-arg MODEL_NAME=mymodel .
# (a named build context replaces the `model` stage below).
#
# Base images are pinned by full version tag. Digests (image:tag@sha256:...) could
# not be resolved where this file was written (no registry access); append them
# with `docker buildx imagetools inspect IMAGE:TAG` for byte-for-byte rebuilds.
#
# ---- ONNX Runtime <-> CUDA <-> cuDNN <-> base image: change them together ----
# An onnxruntime-gpu wheel from PyPI is built for exactly one CUDA major version
# (its metadata says so: the `cuda`/`cudnn` extras name nvidia-*-cu12 or -cu13):
#   onnxruntime-gpu 1.19 ... 1.26   CUDA 12.x + cuDNN 9.x   (this file's default)
#   onnxruntime-gpu 1.27 and later  CUDA 13.x + cuDNN 9.x   (needs NVIDIA driver >= 580)
# CUDA minor versions are interchangeable (CUDA minor-version compatibility);
# the CUDA and cuDNN *majors* of CUDA_IMAGE must match the wheel, or ORT silently
# falls back to the CPU (GET /health then lists only CPUExecutionProvider).
# Move to CUDA 13 with both arguments at once:
#   docker build --build-arg ORT_SPEC=">=1.27,<1.32" \
#     --build-arg CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 -t braincam:gpu .
# ORT_SPEC also pins the CPU `onnxruntime` of the `train` and `cpu` stages, so the
# exporter's parity gate runs on the ORT release that will serve the model (ONNX
# IR/opset support differs between releases: ORT 1.26 loads IR <= 13), and each
# runtime stage checks the baked-in model in its own ORT (docker/verify_model.py).
# 12.6.3 needs an NVIDIA driver >= 560; pick a 12.8+ image for Blackwell GPUs.
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG ORT_SPEC=">=1.20,<1.27"
# The model directory baked into the runtime images (a path in the build context)
# and its name there: /models/${MODEL_NAME}, the image's BRAINCAM_MODEL_DIR.
ARG MODEL_DIR=models/demo
ARG MODEL_NAME=demo

# ============================================================================
# model: only the files of the model directory to bake in. Nothing is built
# here; a named build context `model` (--build-context model=DIR) replaces it.
# ============================================================================
FROM scratch AS model
ARG MODEL_DIR
COPY ${MODEL_DIR}/ /

# ============================================================================
# train: trainer + exporter on CPU TensorFlow, the image of the compose `train`
# and `demo-model` services. Trains nothing while it is built.
# ============================================================================
FROM ${PYTHON_IMAGE} AS train
ARG ORT_SPEC
# HOME, KERAS_HOME, MPLCONFIGDIR: writable for any uid (`docker run --user`, as when
# rebuilding the repository's models/demo into a bind-mounted host directory).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLBACKEND=Agg \
    KERAS_HOME=/tmp/keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 braincam \
 && useradd --system --uid 10001 --gid braincam --no-log-init --create-home braincam \
 && python -m venv /opt/venv \
 && mkdir -p /models /runs /work \
 && chown braincam:braincam /models /runs /work
WORKDIR /src
# Dependencies first, from pyproject.toml alone (empty package stubs), so that a
# code change does not reinstall TensorFlow. README.md* : optional (readme field).
# DL3013: versions are bounded by pyproject.toml and ORT_SPEC; hadolint cannot
# see through a local project's extras (".[...]") or a build argument.
COPY pyproject.toml README.md* ./
# hadolint ignore=DL3013
RUN mkdir braincam service trainer exporter \
 && touch braincam/__init__.py service/__init__.py trainer/__init__.py exporter/__init__.py \
 && pip install --only-binary=:all: ".[cpu,train]" "onnxruntime${ORT_SPEC}" \
 && rm -rf braincam service trainer exporter
COPY braincam ./braincam
COPY service ./service
COPY trainer ./trainer
COPY exporter ./exporter
RUN pip install --no-deps --force-reinstall . && rm -rf build ./*.egg-info
COPY docker/verify_model.py /opt/braincam/
USER 10001:10001
WORKDIR /work
# The compose services override this with a training command.
CMD ["python", "-m", "trainer", "--help"]

# ============================================================================
# cpu-venv / cpu: the service on a slim Python image with CPU onnxruntime.
# ============================================================================
FROM ${PYTHON_IMAGE} AS cpu-venv
ARG ORT_SPEC
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md* ./
# Wheels only: nothing is compiled. DL3013: see the train stage.
# hadolint ignore=DL3013
RUN mkdir braincam service \
 && touch braincam/__init__.py service/__init__.py \
 && pip install --only-binary=:all: ".[cpu]" "onnxruntime${ORT_SPEC}" \
 && rm -rf braincam service
# Only the runtime packages: trainer/ and exporter/ stay out of the service image.
COPY braincam ./braincam
COPY service ./service
RUN pip install --no-deps --force-reinstall . && rm -rf build ./*.egg-info

FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 braincam \
 && useradd --system --uid 10001 --gid braincam --no-log-init --create-home braincam \
 && mkdir -p /models \
 && chown braincam:braincam /models
COPY --from=cpu-venv /opt/venv /opt/venv
COPY docker/healthcheck.py docker/check_env.py docker/verify_model.py /opt/braincam/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BRAINCAM_HOST=0.0.0.0 \
    BRAINCAM_PORT=8000 \
    BRAINCAM_PROVIDERS=CPUExecutionProvider
USER 10001:10001
WORKDIR /home/braincam
# Fails the build if TensorFlow, onnxruntime-gpu or a compiler got in, or if
# braincam/service do not import.
RUN python /opt/braincam/check_env.py cpu
# The model last: changing it (or MODEL_NAME) reuses every layer above.
# verify_model.py fails the build unless model.json is valid, every file matches its
# recorded sha256 and both graphs load and agree in this image's ONNX Runtime.
ARG MODEL_NAME
ENV BRAINCAM_MODEL_DIR=/models/${MODEL_NAME}
COPY --from=model --chown=braincam:braincam / /models/${MODEL_NAME}
RUN python /opt/braincam/verify_model.py "${BRAINCAM_MODEL_DIR}"
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/braincam/healthcheck.py"]
CMD ["python", "-m", "service"]

# ============================================================================
# gpu-venv / gpu: the service on the NVIDIA CUDA + cuDNN runtime image with
# onnxruntime-gpu. The venv is built on the same base image as the runtime
# stage, so its interpreter path (/usr/bin/python3.12) exists there as well.
# ============================================================================
FROM ${CUDA_IMAGE} AS gpu-venv
ARG ORT_SPEC
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# Ubuntu's Python: apt versions are not pinned (DL3008): they change with every
# point release of the base image, which is itself pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md* ./
# Only the `gpu` extra: installing `cpu` too would put onnxruntime and
# onnxruntime-gpu in one environment, where they overwrite each other.
# Wheels only: nothing is compiled. DL3013: see the train stage.
# hadolint ignore=DL3013
RUN mkdir braincam service \
 && touch braincam/__init__.py service/__init__.py \
 && pip install --only-binary=:all: ".[gpu]" "onnxruntime-gpu${ORT_SPEC}" \
 && rm -rf braincam service
COPY braincam ./braincam
COPY service ./service
RUN pip install --no-deps --force-reinstall . && rm -rf build ./*.egg-info

FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
# python3 only (no -dev, no pip, no build tools); apt pins: see gpu-venv.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 braincam \
 && useradd --system --uid 10001 --gid braincam --no-log-init --create-home braincam \
 && mkdir -p /models \
 && chown braincam:braincam /models
COPY --from=gpu-venv /opt/venv /opt/venv
COPY docker/healthcheck.py docker/check_env.py docker/verify_model.py /opt/braincam/
# NVIDIA_* tell the NVIDIA Container Toolkit what to mount (the base image sets
# them too; repeated here so the intent is visible).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    BRAINCAM_HOST=0.0.0.0 \
    BRAINCAM_PORT=8000 \
    BRAINCAM_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider
USER 10001:10001
WORKDIR /home/braincam
# Fails the build if TensorFlow, the CPU onnxruntime package or a compiler got
# in, if this onnxruntime build lacks the CUDA EP, or if the service does not import.
RUN python /opt/braincam/check_env.py gpu
# The model, checked as in the cpu stage (on ORT's CPU EP: no GPU at build time).
ARG MODEL_NAME
ENV BRAINCAM_MODEL_DIR=/models/${MODEL_NAME}
COPY --from=model --chown=braincam:braincam / /models/${MODEL_NAME}
RUN python /opt/braincam/verify_model.py "${BRAINCAM_MODEL_DIR}"
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/braincam/healthcheck.py"]
CMD ["python", "-m", "service"]
