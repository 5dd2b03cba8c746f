# Two commands for a fresh machine:
#   make demo   install the daemon into .venv and inspect the bundled samples
#   make test   install the daemon, the export tools and pytest into .venv, run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test demo-model clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

# Stamps re-run the install whenever the package metadata changes.
$(VENV)/.installed-base: setup.cfg pyproject.toml | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(PY)
	$(PIP) -e ".[export,dev]"
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	rm -rf out/demo
	$(VENV)/bin/station replay samples \
	    --out out/demo/results.jsonl --masks out/demo/masks --overlays out/demo/overlays \
	    --summary-json out/demo/summary.json
	@echo "results: out/demo/results.jsonl  masks: out/demo/masks/  overlays: out/demo/overlays/"

test: $(VENV)/.installed-test
	$(PY) -m pytest

# Retrain the bundled demo model and regenerate the samples (about 3 minutes on 2 cores).
demo-model: $(VENV)/.installed-test
	$(PY) -m export.make_demo

clean:
	rm -rf out build *.egg-info .pytest_cache
