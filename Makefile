# The two commands of the README are `make demo` and `make test`; both create the
# virtualenv on first use. Override PYTHON to pick an interpreter (>= 3.10).
# `make demo` installs only what serving needs (SERVE_EXTRAS) and serves the demo model
# shipped in models/demo: no TensorFlow, no training. `make model` rebuilds that model.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# cpu: onnxruntime (never together with gpu/onnxruntime-gpu: same package dir)
EXTRAS ?= cpu,train,dev,torch
SERVE_EXTRAS ?= cpu
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install demo model serve test test-models lint bench bench-docker docker-images clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	@echo "installing braincam[$(EXTRAS)] into $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(VENV)/.installed-$(EXTRAS)

model: install  ## rebuild the shipped demo model: demo dataset -> train -> export (~10-40 min)
	$(PY) -m trainer.build_demo --data data/demo --out models/demo --force

demo:  ## the main job: serve the shipped demo model at http://$(HOST):$(PORT) (docs at /docs)
	@$(MAKE) --no-print-directory install EXTRAS=$(SERVE_EXTRAS)
	BRAINCAM_MODEL_DIR=models/demo BRAINCAM_HOST=$(HOST) BRAINCAM_PORT=$(PORT) $(PY) -m service

serve: install
	$(PY) -m service

# pytest exits 5 when it collected nothing: that is our mistake, not a pass.
test: install
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-models: install  ## real-size architectures at 224 px, random weights (~30-60 min, ~4 GB)
	$(PY) -m pytest -q -m models; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy braincam service exporter trainer benchmarks

bench: install  ## every figure side by side (3-5 min), report in benchmarks/results/
	$(PY) -m benchmarks --model-dir models/demo

# braincam:cpu, braincam:gpu, braincam:train and the PACS image (compose profile `pacs`).
# Any Docker engine: where it cannot pull the official base image, an equivalent is
# built from Debian's packages first (docker/build_images.py). No virtualenv needed.
docker-images:  ## build the Docker images (cold: ~10 min, mostly the GPU wheels)
	$(PYTHON) docker/build_images.py

bench-docker: install  ## the service in its container vs on the host, side by side
	$(PY) -m benchmarks.bench_docker

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
