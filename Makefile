# Two commands for a fresh machine:
#   make demo   install the daemon into .venv and inspect the bundled samples
#   make test   install the daemon, the export tools and pytest into .venv; lint (ruff), type-check (mypy), run the tests
#               (make test-soak: the soak-style tests it leaves out)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test test-soak docs demo-model bench-models clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

# Stamps re-run the install whenever the package metadata changes.
$(VENV)/.installed-base: setup.cfg pyproject.toml | $(PY)
	$(PIP) -e .
	touch $@

# The genicam extra (PyGObject) builds against Debian's libgirepository1.0-dev and libcairo2-dev
# (.ci/run installs them); without them its tests are skipped, saying why.
$(VENV)/.installed-test: setup.cfg pyproject.toml | $(PY)
	$(PIP) -e ".[export,dev]"
	if pkg-config --exists gobject-introspection-1.0 cairo 2>/dev/null; then $(PIP) -e ".[genicam]"; \
	else echo "GenICam tests will be skipped: apt-get install libgirepository1.0-dev libcairo2-dev gir1.2-aravis-0.8 aravis-tools"; fi
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	rm -rf out/demo
	$(VENV)/bin/station replay samples \
	    --out out/demo/results.jsonl --masks out/demo/masks --overlays out/demo/overlays \
	    --summary-json out/demo/summary.json
	@echo "results: out/demo/results.jsonl  masks: out/demo/masks/  overlays: out/demo/overlays/"

test: $(VENV)/.installed-test
	$(PY) -m ruff check station export tests
	$(PY) -m mypy
	$(PY) -m pytest

# The soak-style tests the default run leaves out (the daemon at full rate for a while, its resources watched).
test-soak: $(VENV)/.installed-test
	$(PY) -m pytest -m soak

# The configuration reference, generated from the config models.
docs: $(VENV)/.installed-base
	$(PY) -m station.configdoc > docs/configuration.md

# Retrain the bundled demo model and regenerate the samples (about 3 minutes on 2 cores).
demo-model: $(VENV)/.installed-test
	$(PY) -m export.make_demo

# The 512 x 512 timing U-Net of config/bench-gpu.yaml (about 2 minutes on 2 cores).
BENCH := .make/bench
bench-models: $(VENV)/.installed-test
	$(PY) -m export.synth $(BENCH)/plates --count 64 --seed 11 --size 512 512 --overwrite
	$(PY) -m export.train $(BENCH)/plates --groups $(BENCH)/plates/plate_groups.json --out $(BENCH)/unet512 \
	    --size 512 512 --alpha 0.35 --multiscale 2 --zoom 2 --epochs 2 --crop 128 --steps 20 --batch 8 --seed 7 \
	    --name unet512-timing --description "timing model for station bench: the magnetic-tile U-Net architecture at 512 x 512, two short epochs on synthetic plates"

clean:
	rm -rf out build *.egg-info .pytest_cache
