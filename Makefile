# One definition of the test command: README and .ci/run both call `make test`.
#
# Without an active venv, everything goes into the project venv .venv/ (created on first use, reused after):
# Debian's and Ubuntu's own python3 refuse `pip install` outside a venv (PEP 668, "externally managed").
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=

IN_VENV := $(shell $(PYTHON) -c 'import sys; print(int(sys.prefix != sys.base_prefix))' 2>/dev/null)
ifeq ($(IN_VENV),1)
PY := $(PYTHON)
PY_DEP :=
BIN :=
RUN :=
else
PY := $(VENV)/bin/python
PY_DEP := $(VENV)/bin/python
BIN := $(VENV)/bin/
RUN := env PATH="$(CURDIR)/$(VENV)/bin:$$PATH"  # the venv's scripts (labkit-vm, qmp-shell) for the tests
endif

.PHONY: install install-test test lint demo venv

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "labkit needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) -V 2>&1)" >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV) >/dev/null 2>&1 || { rm -rf $(VENV); \
	  echo "make: '$(PYTHON) -m venv' failed; on Debian/Ubuntu run: sudo apt-get install python3-venv" >&2; exit 1; }
	@echo "created the project venv $(VENV)/ (activate it with: . $(VENV)/bin/activate)"

venv: $(PY_DEP)

# pip runs again only when pyproject.toml changes (or the venv is new)
$(VENV)/.labkit-installed-test: pyproject.toml | $(PY_DEP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

install: | $(PY_DEP)
	$(PY) -m pip install -q --disable-pip-version-check -e .

install-test: | $(PY_DEP)
ifeq ($(IN_VENV),1)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
else
	@$(MAKE) --no-print-directory $(VENV)/.labkit-installed-test
endif

# ruff; the layers (import-linter's contracts in pyproject.toml: cli -> teach -> measure -> lab -> host ->
# qemu_syntax, the emulator apart); mypy (its configuration in pyproject.toml: strict on vm/ and host/)
lint: install-test
	$(PY) -m ruff check labkit tests scripts
	$(BIN)lint-imports --no-cache
	$(PY) -m mypy

# the whole suite: unit, integration (real processes), notebooks, real QEMU where installed
test: install-test lint
	$(RUN) $(PY) -m pytest $(PYTEST_ARGS)

# install, then migrate one guest with all three modes; figures and results.csv in labkit-demo/
demo: install-test
	$(BIN)labkit demo
