# kdpipe: `make run` runs the pipeline, `make test` runs the test suite. Both create .venv when missing and
# (re)install only when pyproject.toml changed (its hash is kept in .venv/.pyproject.sha256).
SHELL := /bin/bash
VENV := .venv
PYTHON ?= python3
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: venv run test test-fast ui lint bench-quality bench-curriculum

venv:
	@want=$$(sha256sum pyproject.toml | cut -d' ' -f1); \
	have=$$(cat $(VENV)/.pyproject.sha256 2>/dev/null); \
	if [ "$$want" != "$$have" ]; then \
	  echo "installing kdpipe into $(VENV) (pyproject.toml changed or new venv)"; \
	  [ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV) || exit 1; \
	  $(VENV)/bin/pip install -q --upgrade pip && \
	  $(VENV)/bin/pip install -q -e '.[dev]' && \
	  echo "$$want" > $(VENV)/.pyproject.sha256; \
	fi

run: venv
	kdpipe check-params
	dvc repro

test: venv
	python -m pytest -q

test-fast: venv
	python -m pytest -q -m "not slow"

ui: venv
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

lint: venv
	ruff check kdpipe tests flows bench

bench-quality: venv
	python bench/quality.py

bench-curriculum: venv
	python bench/quality.py --curriculum

# Prefect (flows/, prefect.yaml). `make prefect-server` in one terminal, then in another:
#   export PREFECT_API_URL=http://127.0.0.1:4200/api; make deploy; prefect worker start --pool kdpipe-process
.PHONY: prefect-server deploy bench-flow

prefect-server: venv
	prefect server start --host 127.0.0.1 --port 4200

deploy: venv
	@python -c "from prefect.settings import PREFECT_API_URL as u; raise SystemExit(0 if u.value() else \
	  'make deploy: set PREFECT_API_URL first, e.g. http://127.0.0.1:4200/api (see make prefect-server)')"
	prefect work-pool inspect kdpipe-process >/dev/null 2>&1 || prefect work-pool create kdpipe-process --type process
	prefect --no-prompt deploy --all

bench-flow: venv
	python bench/flow_overhead.py
