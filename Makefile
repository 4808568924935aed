# ISPF Match. `make demo` runs a local federation; `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.DEFAULT_GOAL := help
.PHONY: help install dev browser valgrind postgres demo test test-slow lint typecheck proto proto-check pytest pytest-portable bench bench-compare bench-load clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# setup.py builds the optional C modules (ispf.hazmat._native, ispf._records) in
# place; without a C compiler the install still succeeds and the pure-Python code is used.
NATIVE_SRC := common/ispf/hazmat/_native.c common/ispf/_records.c common/ispf/_blake3.h
$(VENV)/.installed: pyproject.toml setup.py $(NATIVE_SRC) | $(BIN)/python
	$(PIP) install -e .
	@touch $@

$(VENV)/.dev: pyproject.toml setup.py $(NATIVE_SRC) | $(BIN)/python
	$(PIP) install -e '.[dev]'
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed ## create .venv and install the node, CLI and SDK (open source only)

dev: $(VENV)/.dev ## install with the development tools

# The HTML report test renders in headless Chromium (Debian's package, as root).
browser: ## install Chromium for the report test if it is missing
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) \
	    >/dev/null 2>&1 && echo "browser: chromium installed" || \
	    echo "browser: could not install chromium; the HTML report test will be skipped"; }

# The X25519 constant-time check runs the ladder under valgrind memcheck (Debian's
# package, as root); without it that one test is skipped and says why.
valgrind: ## install valgrind for the X25519 constant-time check if it is missing
	@command -v valgrind >/dev/null 2>&1 || \
	  { (apt-get update -qq && apt-get install -y -qq --no-install-recommends valgrind) \
	    >/dev/null 2>&1 && echo "valgrind: installed" || \
	    echo "valgrind: could not install valgrind; the X25519 constant-time check will be skipped"; }

# The PostgreSQL-backend tests start a throw-away server of their own (tests/pgserver.py:
# initdb in a temporary folder, a Unix socket only) from Debian's package, as root;
# without it those tests are skipped and say why.
postgres: ## install PostgreSQL for the PostgreSQL-backend tests if it is missing
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { (apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql) \
	    >/dev/null 2>&1 && echo "postgres: installed" || \
	    echo "postgres: could not install postgresql; the PostgreSQL-backend tests will be skipped"; }

demo: install ## run four provinces on loopback and reconcile every pair (reports in demo-out/)
	$(BIN)/ispf demo $(DEMO_ARGS)

test: dev browser valgrind postgres lint typecheck proto-check pytest pytest-portable ## every check CI runs

test-slow: dev ## the long X25519 evidence: RFC 7748's 1,000,000 iterations, 1,000,000 differential pairs
	ISPF_X25519_SLOW=1 $(BIN)/python -m pytest -q -p no:randomly -m x25519_slow tests/unit/test_x25519_evidence.py

lint: dev ## ruff lint and format check; the import contracts (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: dev ## mypy --strict
	$(BIN)/mypy

proto: dev ## regenerate the committed stubs in common/ispf/v1 from proto/
	PYTHON=$(BIN)/python scripts/gen_proto.sh

proto-check: dev ## fail if the committed stubs differ from what proto/ generates
	@tmp=$$(mktemp -d) && PYTHON=$(BIN)/python scripts/gen_proto.sh $$tmp >/dev/null 2>&1 && \
	  diff -r -x __pycache__ $$tmp/ispf/v1 common/ispf/v1 && rm -rf $$tmp && \
	  echo "proto-check: generated stubs are up to date"

pytest: dev ## the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Machines without a C compiler run the Python code in place of the native modules
# (ISPF_NATIVE=0 switches off both, the curve's and the record operations').
pytest-portable: dev ## the core tests again, with the native modules switched off
	ISPF_NATIVE=0 $(BIN)/python -m pytest -q tests/unit tests/integration/test_reconcile.py \
	  tests/integration/test_incremental.py tests/integration/test_online_check.py

bench: dev ## benchmarks (figures, not pass/fail): blinding vs raw X25519; full vs incremental; pair-state overlay vs compacted; checks (nodes in their own processes); registry load vs plain SQLite; 1M x 1M vs SecretFlow and OpenMined
	$(BIN)/python bench/blinding.py
	$(BIN)/python bench/online_incremental.py $(BENCH_ARGS)
	$(BIN)/python bench/compaction.py
	$(BIN)/python bench/checks.py $(CHECKS_ARGS)
	$(BIN)/python bench/load.py $(LOAD_BENCH_ARGS)
	$(BIN)/python bench/psi_compare.py --write $(COMPARE_ARGS)

bench-compare: dev ## only the 1M x 1M comparison (own venvs; writes docs/benchmarks.md); COMPARE_ARGS="--n 100000 --repeat 1" for a quick one
	$(BIN)/python bench/psi_compare.py --write $(COMPARE_ARGS)

bench-load: dev ## load test: 32 concurrent online checks for 60 s
	$(BIN)/python bench/load_check.py $(LOAD_ARGS)

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache demo-out .bench-venvs build
	rm -f common/ispf/hazmat/_native.*.so common/ispf/_records.*.so
