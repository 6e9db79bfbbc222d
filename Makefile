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

.PHONY: env test demo lint bench clean

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
