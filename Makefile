# One definition of the test command: README and .ci/run both call `make test`.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: install install-test test lint demo

install:
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -m pip install -q -e '.[test]'

lint: install-test
	$(PYTHON) -m ruff check labkit tests scripts

# the whole suite: unit, integration (real processes), notebooks, real QEMU where installed
test: install-test lint
	$(PYTHON) -m pytest $(PYTEST_ARGS)

demo: install
	labkit demo
