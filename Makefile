# smartgrid: the two commands a newcomer needs are `make run` and `make test`.
# The Makefile builds its own virtual environment (.venv); nothing is installed by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run up test test-deps lint dashboard broker bench-tools clean help

help:
	@echo "make run   start the stack, run the compressed seed scenario, print the report, stop"
	@echo "make up    start the stack and keep it running until Ctrl-C"
	@echo "make test  run the test suite (installs what it needs first: see scripts/ensure-test-deps)"
	@echo "make lint  ruff check, ruff format --check, mypy (as CI runs them)"
	@echo "make dashboard  write the Grafana dashboard's JSON from its code, monitoring/dashboard.py"
	@echo "make bench-tools  install what the benchmarks use beyond the venv (py-spy, and wrk: Debian's)"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

broker:
	@scripts/ensure-rabbitmq

# Debian packages the tests use (Prometheus, a Docker Engine, Chromium), and the compose
# CLI plugin; as root it installs what is missing, otherwise it says what to run.
test-deps: $(STAMP)
	@scripts/ensure-test-deps

run: $(STAMP) broker
	$(BIN)/python -m stack run

up: $(STAMP) broker
	$(BIN)/python -m stack up

test: $(STAMP) test-deps broker
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The Grafana dashboard is code (monitoring/dashboard.py); this writes the JSON Grafana reads.
dashboard: $(STAMP)
	$(BIN)/python -m monitoring.dashboard

# wrk: the C HTTP load generator of bench.cpu --client wrk (Debian's package; needs root);
# py-spy (the bench extra): bench.profile's sampler.
bench-tools: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[bench]'
	@command -v wrk >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk; }

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
