# The two commands a new user needs: `make serve` and `make test` (see README.md).
PYTHON ?= python3
# Another interpreter gets a virtualenv of its own: `make test PYTHON=python3.13` uses .venv-python3.13.
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
BIN := $(VENV)/bin
ARGS ?=

.PHONY: serve test lint typecheck unit bench soak autobahn clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "callsock needs Python >= 3.11; set PYTHON=python3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Runtime install: what `make serve` needs.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

# Development install: runtime plus test and lint tools.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/callsock serve $(ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

unit: $(VENV)/.installed-dev
	$(BIN)/pytest -m "not slow" $(ARGS)

test: lint typecheck unit

# The side-by-side benchmark (a few minutes; needs node and npm): see BENCHMARKS.md.
bench: $(VENV)/.installed-dev benchmarks/node/node_modules
	$(BIN)/python benchmarks/run.py $(ARGS)

# The soak (about a minute; not part of make test): thousands of calls, then memory, descriptors and
# tasks back to baseline. CALLSOCK_SOAK_CALLS, CALLSOCK_SOAK_CONCURRENT, CALLSOCK_SOAK_REPORT tune it.
soak: $(VENV)/.installed-dev
	$(BIN)/pytest -m slow -s tests/test_soak.py $(ARGS)

# The Autobahn WebSocket fuzzing client (cases 1-7, 9, 10; some minutes) against callsock's own framing.
# autobahntestsuite runs on Python 2.7 only: PYTHON2 names one (with virtualenv, or pip to install it).
PYTHON2 ?= python2.7
AUTOBAHN := .venv-autobahn
$(AUTOBAHN)/bin/wstest:
	@$(PYTHON2) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)' || { echo "make autobahn needs Python 2.7: set PYTHON2=/path/to/python2.7"; exit 1; }
	$(PYTHON2) -m virtualenv --version >/dev/null 2>&1 || $(PYTHON2) -m pip install --quiet virtualenv
	$(PYTHON2) -m virtualenv --quiet $(AUTOBAHN)
	$(AUTOBAHN)/bin/pip install --quiet autobahntestsuite

autobahn: $(VENV)/.installed-dev $(AUTOBAHN)/bin/wstest
	$(BIN)/python -m benchmarks.autobahn.run --wstest $(AUTOBAHN)/bin/wstest $(ARGS)

benchmarks/node/node_modules: benchmarks/node/package.json benchmarks/node/package-lock.json
	cd benchmarks/node && npm ci --no-audit --no-fund
	@touch $@

clean:
	rm -rf .venv .venv-* .mypy_cache .ruff_cache .pytest_cache
