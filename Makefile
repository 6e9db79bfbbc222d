# Two commands for a fresh machine: `make demo` and `make test`. Each creates or refreshes the
# local virtual environment first. A stamp keyed on the requirement files (and the installer)
# makes a second run skip every install.
#
# `make test` checks d2ema as users get it: ruff, mypy and the docs build (warnings are errors)
# on the checkout, then `python -m build` makes the sdist and, from it, the wheel; the wheel is
# installed into $(VENV) (not editable) and the suite runs against that installed copy, with
# src/ on no path (tests/test_package.py fails if the tests would import src/ or if a module of
# src/ is missing from the wheel). `make demo` runs the same installed wheel.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ENV_INPUTS := pyproject.toml requirements/base.txt requirements/detectron2.txt \
              requirements/docs.txt requirements/lightning.txt tools/install_detectron2.py \
              tools/detectron2_C_stub.py
ENV_KEY := $(shell cat $(ENV_INPUTS) | sha256sum | cut -c1-16)
STAMP  := $(VENV)/.d2ema-env-$(ENV_KEY)
BENCH_STAMP := $(VENV)/.d2ema-bench-$(shell cat requirements/bench.txt | sha256sum | cut -c1-16)

PIP    := $(PY) -m pip -q --disable-pip-version-check
SOURCES := $(shell find src -type f ! -path '*/__pycache__/*') pyproject.toml README.md LICENSE
WHEEL_STAMP := $(VENV)/.d2ema-wheel
export NO_MKDOCS_2_WARNING := 1

.PHONY: env wheel test test-d2-main demo lint typecheck docs bench clean

env: $(STAMP)

$(STAMP): $(ENV_INPUTS)
	@echo "[d2ema] setting up $(VENV) (once; later runs reuse it)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements/base.txt -r requirements/docs.txt -r requirements/lightning.txt
	$(PY) tools/install_detectron2.py
	rm -f $(VENV)/.d2ema-env-* $(WHEEL_STAMP)
	touch $@

# sdist, then the wheel built from it (so a file missing from the sdist fails too), installed
# over any earlier d2ema (an editable one included) without touching its dependencies.
wheel: $(WHEEL_STAMP)

$(WHEEL_STAMP): $(STAMP) $(SOURCES)
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist . > $(VENV)/build.log 2>&1 \
		|| { cat $(VENV)/build.log; exit 1; }
	$(PIP) install --no-deps --force-reinstall dist/d2ema-*.whl
	touch $@

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

# The suite runs from tests/ with no PYTHONPATH: `import d2ema` finds the installed wheel only.
test: lint typecheck docs $(WHEEL_STAMP)
	cd tests && env -u PYTHONPATH D2EMA_EXPECT_INSTALLED=1 D2EMA_WHEEL="$$(ls $(CURDIR)/dist/d2ema-*.whl)" \
		$(abspath $(PY)) -m pytest -q -p no:cacheprovider --rootdir=$(CURDIR) -c $(CURDIR)/pyproject.toml .

# The same tests against detectron2 main's Python sources (no network here: give a checkout),
# e.g. `make test-d2-main D2_SRC=../detectron2`; compiled ops come from our stub, as for v0.6.
test-d2-main: $(WHEEL_STAMP)
	test -d "$(D2_SRC)/detectron2" || { echo "D2_SRC=<a detectron2 checkout> is required"; exit 2; }
	rm -rf .d2main && mkdir .d2main && cp -r "$(D2_SRC)/detectron2" .d2main/
	cp tools/detectron2_C_stub.py .d2main/detectron2/_C.py
	PYTHONPATH=.d2main $(PY) -m pytest -q -p no:cacheprovider tests --deselect tests/test_install.py

demo: $(WHEEL_STAMP)
	$(VENV)/bin/d2ema demo $(ARGS)

$(BENCH_STAMP): $(STAMP) requirements/bench.txt
	$(PIP) install -r requirements/bench.txt
	rm -f $(VENV)/.d2ema-bench-*
	touch $@

bench: $(BENCH_STAMP) $(WHEEL_STAMP)
	$(PY) benchmarks/update_speed.py $(ARGS)

clean:
	rm -rf $(VENV) dist site
