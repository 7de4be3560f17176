# smartgrid: the two commands a newcomer needs are `make run` and `make test`.
# The Makefile builds its own virtual environment (.venv); nothing is installed by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run up test lint dashboard broker clean help

help:
	@echo "make run   start the stack, run the compressed seed scenario, print the report, stop"
	@echo "make up    start the stack and keep it running until Ctrl-C"
	@echo "make test  run the test suite (against the local RabbitMQ)"
	@echo "make lint  ruff check, ruff format --check, mypy (as CI runs them)"
	@echo "make dashboard  write the Grafana dashboard's JSON from its code, monitoring/dashboard.py"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

broker:
	@scripts/ensure-rabbitmq

run: $(STAMP) broker
	$(BIN)/python -m stack run

up: $(STAMP) broker
	$(BIN)/python -m stack up

test: $(STAMP) broker
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The Grafana dashboard is code (monitoring/dashboard.py); this writes the JSON Grafana reads.
dashboard: $(STAMP)
	$(BIN)/python -m monitoring.dashboard

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
