# Local virtual environment: created or refreshed when setup.cfg / pyproject.toml change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# torch first, pinned: a bare "torch" requirement would pull a CUDA build from the index
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(INSTALLED)

$(INSTALLED): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(INSTALLED)
	$(VENV)/bin/medfm demo --out demo_output

test: $(INSTALLED)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache
