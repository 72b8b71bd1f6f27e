# Two commands for a fresh machine with Python 3.11:  make run   |   make test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test repro sst2 quant-noise mlflow-ui clean

install: $(STAMP)

# Reinstall only when the dependency spec or the lock changes.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]" -c requirements.lock
	touch $(STAMP)

run: install          ## the whole pipeline on params.yaml (MLflow parent run + Prefect flow)
	$(PY) -m flows.pipeline

test: install         ## the test suite (offline, ~minutes on 2 cores)
	$(PY) -m pytest -q

sst2: install         ## the same pipeline on GLUE SST-2 from ../shared/datasets/sst2 (configs/sst2.yaml)
	$(PY) -m flows.pipeline --params configs/sst2.yaml

quant-noise: install  ## Quant-Noise vs plain PTQ on the teacher of `make run` -> reports/quant_noise.md
	$(PY) benchmarks/quant_noise.py

repro: install        ## the same stages through DVC, rerunning only what changed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro   # dvc.yaml stages call `python`: the venv's

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db

clean:                ## remove pipeline outputs (not the venv, not MLflow's store)
	rm -rf data models checkpoints reports
