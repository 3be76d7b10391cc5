# SPDX-License-Identifier: GPL-2.0-or-later
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv system test test-fast test-faults lint demo bench clean

all: test

system:
	@sh tools/ensure-system.sh

$(STAMP): setup.cfg setup.py
	@sh tools/ensure-system.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check dlms2amqp tests bench tools testing
	$(BIN)/mypy

# Everything, fault-injection suite included (this is what CI runs).
test: $(STAMP) system lint
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# Quick loop while developing: no fault-injection suite.
test-fast: $(STAMP) system
	$(BIN)/python -m pytest -q -ra -m 'not faults' $(PYTEST_ARGS)

test-faults: $(STAMP) system
	$(BIN)/python -m pytest -q -ra -m faults $(PYTEST_ARGS)

demo: $(STAMP) system
	$(BIN)/python tools/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
