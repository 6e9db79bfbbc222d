# Two commands for a fresh machine: `make demo` and `make test`. Each creates or refreshes the
# local virtual environment first. A stamp keyed on the requirement files (and the installer)
# makes a second run skip every install.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ENV_INPUTS := pyproject.toml requirements/base.txt requirements/detectron2.txt \
              tools/install_detectron2.py tools/detectron2_C_stub.py
ENV_KEY := $(shell cat $(ENV_INPUTS) | sha256sum | cut -c1-16)
STAMP  := $(VENV)/.d2ema-env-$(ENV_KEY)
BENCH_STAMP := $(VENV)/.d2ema-bench-$(shell cat requirements/bench.txt | sha256sum | cut -c1-16)

.PHONY: env test test-d2-main demo lint bench clean

env: $(STAMP)

$(STAMP): $(ENV_INPUTS)
	@echo "[d2ema] setting up $(VENV) (once; later runs reuse it)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/base.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.d2ema-env-*
	touch $@

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider tests

# The same tests against detectron2 main's Python sources (no network here: give a checkout),
# e.g. `make test-d2-main D2_SRC=../detectron2`; compiled ops come from our stub, as for v0.6.
test-d2-main: $(STAMP)
	test -d "$(D2_SRC)/detectron2" || { echo "D2_SRC=<a detectron2 checkout> is required"; exit 2; }
	rm -rf .d2main && mkdir .d2main && cp -r "$(D2_SRC)/detectron2" .d2main/
	cp tools/detectron2_C_stub.py .d2main/detectron2/_C.py
	PYTHONPATH=.d2main $(PY) -m pytest -q -p no:cacheprovider tests --deselect tests/test_install.py

demo: $(STAMP)
	$(VENV)/bin/d2ema demo $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

$(BENCH_STAMP): $(STAMP) requirements/bench.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/bench.txt
	rm -f $(VENV)/.d2ema-bench-*
	touch $@

bench: $(BENCH_STAMP)
	$(PY) benchmarks/update_speed.py $(ARGS)

clean:
	rm -rf $(VENV)
