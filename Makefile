# Two commands for a fresh machine with Python 3.11:  make run   |   make test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test test-unit repro push pull bench sst2 quant-noise faults families serve-check mlflow-ui services services-stop bench-scaling clean

install: $(STAMP)

# Reinstall only when the dependency spec or the lock changes.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]" -c requirements.lock
	touch $(STAMP)

run: install          ## the whole pipeline on params.yaml (MLflow parent run + Prefect flow)
	$(PY) -m flows.pipeline

test: install         ## the whole test suite (offline, ~minutes on 2 cores)
	$(PY) -m pytest -q

test-unit: install    ## the fast unit tests alone (no slow or end-to-end tests; about 2 minutes)
	$(PY) -m pytest -q -m "not slow and not e2e"

# bench: the pipeline; then the peer tools (Optimum, Olive), each by its own code in its own venv under
# bench/.venvs/ (made on first use: python3.11, the CPU torch wheel pinned), written as model folders under
# models/sst2/peers/ and evaluated by our code; then one interleaved timing of every model, peers included;
# then the write-up. A failed recipe or peer still gets its write-up; the exit status says it failed.
bench: install        ## SST-2 benchmark (../shared/datasets/sst2, configs/sst2.yaml, ~50-70 min on 2 cores with the search and the peers) -> BENCHMARKS.md
	$(PY) -m flows.pipeline --params configs/sst2.yaml; status=$$?; \
	$(PY) benchmarks/peers.py --params configs/sst2.yaml || status=1; \
	$(PY) -m flows.compare --params configs/sst2.yaml --with-peers || status=1; \
	$(PY) benchmarks/sst2.py --params configs/sst2.yaml && exit $$status

sst2: bench           ## (old name of bench)

# bench-scaling: the default recipes on 1, then 2 Prefect process workers (README "Recipes on a work pool"); starts
# and stops its own PostgreSQL, MLflow and Prefect servers in a temporary folder. Run it on an idle machine.
# SCALING_ARGS="--params configs/tiny.yaml" is a ~10-minute check that every part runs.
bench-scaling: install  ## recipe wall time on 1 and 2 workers (~40 min on 2 cores) -> bench/results/fan_out_scaling.{json,md}
	$(PY) benchmarks/fan_out_scaling.py $(SCALING_ARGS)

serve-check: install  ## load models:/<name>@champion through MLflow and classify test texts
	$(PY) -m flows.serve_check

faults: install       ## every bad input and fault of issue 13 through the CLI (~15 min) -> FAULTS.md
	$(PY) benchmarks/faults.py

families: install     ## every step on a tiny model of every architecture (~5 min) -> FAMILIES.md
	$(PY) benchmarks/families.py

quant-noise: install  ## Quant-Noise vs plain PTQ on the teacher of `make run` -> reports/quant_noise.md
	$(PY) benchmarks/quant_noise.py

repro: install        ## the same stages through DVC, rerunning only what changed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro   # dvc.yaml stages call `python`: the venv's

# The DVC remote (README "DVC remote"): `dvc remote add -d storage s3://...` once; credentials from the
# environment or ~/.aws, never in .dvc/config.
push: install         ## upload every cached output in dvc.lock (prepared data, teacher, floor, candidates)
	$(PY) -m dvc push

pull: install         ## a worker on a fresh checkout: fetch the prepared data and the teacher
	$(PY) -m dvc pull prepare teacher

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db

services: install     ## PostgreSQL + an MLflow tracking server on it, on localhost (state in .services/; idempotent)
	$(PY) -m services start

services-stop: install  ## stop both (the data stays in .services/)
	$(PY) -m services stop

clean:                ## remove pipeline outputs (not the venv, not MLflow's store)
	rm -rf data models checkpoints reports
