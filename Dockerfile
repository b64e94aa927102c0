# braincam images: the inference service on ONNX Runtime, GPU (default) or CPU,
# plus a training image. See docs/docker.md.
#
#   make docker-images                                 # all three (+ the PACS image), any engine
#   docker build -t braincam:gpu .                     # last stage = `gpu` (CUDA EP)
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
# (a named build context replaces the `model` stage below; it needs buildx).
#
# BuildKit is required (RUN --mount): the default builder of Docker Engine >= 23,
# DOCKER_BUILDKIT=1 on older CLIs. There is no `# syntax=` line on purpose: it would
# pull a Dockerfile frontend image, and the builder's built-in frontend is enough.
#
# Every stage starts from PYTHON_IMAGE, the official Python image (a Debian bookworm
# slim image). An engine that cannot pull gets an equivalent base built locally from
# Debian's packages by docker/build_images.py (`make docker-images`), passed in as
# --build-arg PYTHON_IMAGE=...; its Python is Debian's python3 (3.11).
# Base images are pinned by full version tag. Digests (image:tag@sha256:...) could
# not be resolved where this file was written (no registry access); append them
# with `docker buildx imagetools inspect IMAGE:TAG` for byte-for-byte rebuilds.
#
# pip reaches PyPI from inside the build. Behind a TLS-inspecting proxy it must trust
# the host's CA bundle: docker/build_images.py hands the file pip is configured with
# (PIP_CERT) in as the build secret `pip_cert`, mounted for the pip steps only and
# never written to a layer. Without the secret pip uses its own CA bundle. Wheels
# are kept in a BuildKit cache mount, so a rebuild after a code change downloads
# nothing.
#
# ---- ONNX Runtime, CUDA and cuDNN ----
# The GPU image needs no NVIDIA base image: onnxruntime-gpu's `cuda` and `cudnn`
# extras install the CUDA runtime, cuBLAS, cuFFT, cuRAND, NVRTC and cuDNN from
# NVIDIA's PyPI wheels, always for the CUDA major that wheel was built for:
#   onnxruntime-gpu 1.19 ... 1.26   CUDA 12.x + cuDNN 9.x   (default ORT_SPEC; driver >= 525)
#   onnxruntime-gpu 1.27 and later  CUDA 13.x + cuDNN 9.x   (NVIDIA driver >= 580)
# The host provides only the driver (NVIDIA Container Toolkit). The wheels' library
# folders are registered with the dynamic loader (ldconfig), and check_env.py fails
# the build unless every library of ORT's CUDA provider resolves.
# ORT_SPEC also pins the CPU `onnxruntime` of the `train` and `cpu` stages, so the
# exporter's parity gate runs on the ORT release that will serve the model (ONNX
# IR/opset support differs between releases: ORT 1.26 loads IR <= 13), and each
# runtime stage checks the baked-in model in its own ORT (docker/verify_model.py).
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
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
# Dependencies first, from pyproject.toml alone (empty package stubs, and an empty
# README.md for its readme field: an edit of the real one must not reinstall anything),
# so that a code change does not reinstall TensorFlow.
# docker/pip_install.sh: wheels only, from a download folder that is a BuildKit cache
# mount (never in a layer); versions are bounded by pyproject.toml and ORT_SPEC.
COPY pyproject.toml ./
COPY docker/pip_install.sh /opt/braincam/
RUN --mount=type=secret,id=pip_cert --mount=type=cache,id=braincam-wheels-train,target=/wheels \
    mkdir braincam service trainer exporter \
 && touch README.md braincam/__init__.py service/__init__.py trainer/__init__.py \
    exporter/__init__.py \
 && /opt/braincam/pip_install.sh deps ".[cpu,train]" "onnxruntime${ORT_SPEC}" \
 && rm -rf braincam service trainer exporter build ./*.egg-info \
 && python -m compileall -q -j 0 /opt/venv/lib
COPY braincam ./braincam
COPY service ./service
COPY trainer ./trainer
COPY exporter ./exporter
RUN --mount=type=secret,id=pip_cert --mount=type=cache,id=braincam-wheels-train,target=/wheels \
    /opt/braincam/pip_install.sh project \
 && python -m compileall -q /opt/venv/lib/python*/site-packages/braincam \
    /opt/venv/lib/python*/site-packages/service /opt/venv/lib/python*/site-packages/trainer \
    /opt/venv/lib/python*/site-packages/exporter
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
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
COPY docker/pip_install.sh docker/slim_venv.sh docker/check_env.py /opt/braincam/
RUN --mount=type=secret,id=pip_cert --mount=type=cache,id=braincam-wheels-cpu,target=/wheels \
    mkdir braincam service \
 && touch README.md braincam/__init__.py service/__init__.py \
 && /opt/braincam/pip_install.sh deps ".[cpu]" "onnxruntime${ORT_SPEC}" \
 && rm -rf braincam service build ./*.egg-info
# Only the runtime packages: trainer/ and exporter/ stay out of the service image.
COPY braincam ./braincam
COPY service ./service
# Then slimmed for the runtime (docker/slim_venv.sh): no pip, no tests, stubs or
# headers of the dependencies, bytecode only for the modules the service imports.
RUN --mount=type=secret,id=pip_cert --mount=type=cache,id=braincam-wheels-cpu,target=/wheels \
    /opt/braincam/pip_install.sh project \
 && /opt/braincam/slim_venv.sh

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
# Probed every 5 s so that a started container turns healthy within seconds of the
# model being loaded (a --start-interval needs Docker Engine >= 25); a model that
# cannot load makes it unhealthy about 30 s after the start.
HEALTHCHECK --interval=5s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "/opt/braincam/healthcheck.py"]
CMD ["python", "-m", "service"]

# ============================================================================
# gpu-venv / gpu: the service with onnxruntime-gpu, CUDA and cuDNN from PyPI
# wheels, on the same Debian base as the other images.
# ============================================================================
FROM ${PYTHON_IMAGE} AS gpu-venv
ARG ORT_SPEC
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
# Only the `gpu` extra: installing `cpu` too would put onnxruntime and
# onnxruntime-gpu in one environment, where they overwrite each other. The `cuda`
# and `cudnn` extras bring NVIDIA's libraries; the plain requirement with the same
# bounds keeps pip's resolver from fetching releases outside them first.
COPY docker/pip_install.sh docker/slim_venv.sh docker/check_env.py /opt/braincam/
RUN --mount=type=secret,id=pip_cert --mount=type=cache,id=braincam-wheels-gpu,target=/wheels \
    mkdir braincam service \
 && touch README.md braincam/__init__.py service/__init__.py \
 && /opt/braincam/pip_install.sh deps ".[gpu]" "onnxruntime-gpu${ORT_SPEC}" \
    "onnxruntime-gpu[cuda,cudnn]${ORT_SPEC}" \
 && rm -rf braincam service build ./*.egg-info
COPY braincam ./braincam
COPY service ./service
# Slimmed as in cpu-venv.
RUN --mount=type=secret,id=pip_cert --mount=type=cache,id=braincam-wheels-gpu,target=/wheels \
    /opt/braincam/pip_install.sh project \
 && /opt/braincam/slim_venv.sh

FROM ${PYTHON_IMAGE} AS gpu
COPY --from=gpu-venv /opt/venv /opt/venv
# The CUDA and cuDNN libraries of the nvidia-* wheels, registered with the dynamic
# loader: ORT's CUDA provider and cuDNN (which loads its engines by name) find them
# in any process, without LD_LIBRARY_PATH.
RUN groupadd --system --gid 10001 braincam \
 && useradd --system --uid 10001 --gid braincam --no-log-init --create-home braincam \
 && mkdir -p /models \
 && chown braincam:braincam /models \
 && find /opt/venv -type d -path "*/site-packages/nvidia/*/lib" \
    > /etc/ld.so.conf.d/braincam-nvidia-wheels.conf \
 && ldconfig
COPY docker/healthcheck.py docker/check_env.py docker/verify_model.py /opt/braincam/
# NVIDIA_* tell the NVIDIA Container Toolkit what to mount: the driver's libraries.
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
# Fails the build if TensorFlow, the CPU onnxruntime package or a compiler got in,
# if this onnxruntime build lacks the CUDA EP or a library it needs, or if the
# service does not import.
RUN python /opt/braincam/check_env.py gpu
# The model, checked as in the cpu stage (on ORT's CPU EP: no GPU at build time).
ARG MODEL_NAME
ENV BRAINCAM_MODEL_DIR=/models/${MODEL_NAME}
COPY --from=model --chown=braincam:braincam / /models/${MODEL_NAME}
RUN python /opt/braincam/verify_model.py "${BRAINCAM_MODEL_DIR}"
EXPOSE 8000
# As in the cpu stage, with a longer start period: CUDA and cuDNN take a while to start.
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/braincam/healthcheck.py"]
CMD ["python", "-m", "service"]
