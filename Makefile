# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) pipelines/digits.py --out runs/demo

# Every tier: unit (pure torch), ray (a real local Ray cluster), e2e (subprocess pipelines,
# job submit, tracking server, cluster configs). What CI and the README run.
test: $(STAMP)
	$(PY) -m pytest -q

# The unit tier alone: minutes, no Ray cluster.
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

# docs/configuration.md is generated from dmdscale/config.py (tests/unit/test_docs.py checks it).
docs: $(STAMP)
	$(PY) -m dmdscale.tools.config_reference > docs/configuration.md.tmp
	mv docs/configuration.md.tmp docs/configuration.md

bench: $(STAMP)
	$(PY) bench/toy2d_ablations.py
	$(PY) bench/digits_throughput.py
	$(PY) bench/digits_ablations.py --steps 200

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
