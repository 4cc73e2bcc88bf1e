# Local virtual environment: created or refreshed when setup.cfg / pyproject.toml change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# torch first, pinned: a bare "torch" requirement would pull a CUDA build from the index
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# pytest-xdist processes: much of the suite waits on Python and torchrun start-up, so two share two cores well;
# tests marked xdist_group share one worker (and its module fixtures)
TEST_WORKERS ?= 2

# MONAI Label 0.8.5 in its own environment (its pins clash with medfm's): the integration test
# in tests/integration serves medfm label bundles with it
MONAILABEL_VENV ?= .venv-monailabel
MONAILABEL_INSTALLED := $(MONAILABEL_VENV)/.installed
MONAILABEL_REQUIREMENTS := tests/integration/monailabel-requirements.txt

# The lowest torch and MONAI that setup.cfg declares, in an environment of their own (torch 2.5.1 from PyPI is a
# CUDA build, about 7 GB with its libraries): CI runs the tests marked "training" there as well (make test-lowest):
# every bundle's training workflows and medfm's trainer
LOWEST_VENV ?= .venv-lowest
LOWEST_INSTALLED := $(LOWEST_VENV)/.installed

# Orthanc PACS with its DICOMweb plugin (Debian packages) for the DICOMweb tests: installed with
# apt-get where missing when run as root (CI); elsewhere the tests skip and say how to install it
ORTHANC_PACKAGES := orthanc orthanc-dicomweb
# The DICOM standard's object validator (dciodvfy): every DICOM object medfm writes must pass it
VALIDATOR_PACKAGES := dicom3tools

.PHONY: demo test test-data test-lowest install clean lowest-env monailabel-env orthanc dicom-validator

install: $(INSTALLED)

$(INSTALLED): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

monailabel-env: $(MONAILABEL_INSTALLED)

$(MONAILABEL_INSTALLED): setup.cfg pyproject.toml $(MONAILABEL_REQUIREMENTS)
	test -x $(MONAILABEL_VENV)/bin/python || $(PYTHON) -m venv $(MONAILABEL_VENV)
	$(MONAILABEL_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(MONAILABEL_VENV)/bin/python -m pip install --quiet -e . -r $(MONAILABEL_REQUIREMENTS)
	$(MONAILABEL_VENV)/bin/python -m pip install --quiet --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
	touch $@

lowest-env: $(LOWEST_INSTALLED)

$(LOWEST_INSTALLED): setup.cfg pyproject.toml tests/lowest_requirements.py
	test -x $(LOWEST_VENV)/bin/python || $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet $$($(PYTHON) tests/lowest_requirements.py torch)
	$(LOWEST_VENV)/bin/python -m pip install --quiet -e ".[test]" $$($(PYTHON) tests/lowest_requirements.py)
	touch $@

demo: $(INSTALLED)
	$(VENV)/bin/medfm demo --out demo_output

# real images from PyPI / Debian packages; tests that need a missing one skip and say so
# (CI sets MEDFM_REQUIRE_TEST_DATA=1, which turns those skips into failures)
test-data: $(INSTALLED)
	-$(PY) tests/testdata.py

# Debian packages the tests use, installed in one apt-get run where missing (as root: CI); elsewhere the tests
# that need them skip and say how to install them
orthanc dicom-validator:
	@missing=""; \
	{ [ -x /usr/sbin/Orthanc ] && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1; } || missing="$(ORTHANC_PACKAGES)"; \
	command -v dciodvfy >/dev/null || missing="$$missing $(VALIDATOR_PACKAGES)"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "medfm: not installed: $$missing ('sudo apt-get install $$missing'; the tests that need them skip)"; fi

test: $(INSTALLED) test-data $(MONAILABEL_INSTALLED) orthanc
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=30 $(PYTEST_ARGS)

# the training workflows against the lowest declared torch and MONAI (CI runs this before make test)
test-lowest: $(LOWEST_INSTALLED) test-data
	$(LOWEST_VENV)/bin/python -m pytest -n $(TEST_WORKERS) --durations=10 -m training $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(MONAILABEL_VENV) demo_output .pytest_cache .cache
