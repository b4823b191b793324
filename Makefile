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

.PHONY: venv run test test-e2e test-fast ui serve lint bench-quality bench-curriculum bench-views bench-augment bench-methods bench-recipes bench-streaming bench-distributed bench-speed

venv:
	@want=$$(sha256sum pyproject.toml | cut -d' ' -f1); \
	have=$$(cat $(VENV)/.pyproject.sha256 2>/dev/null); \
	if [ "$$want" != "$$have" ]; then \
	  echo "installing kdpipe into $(VENV) (pyproject.toml changed or new venv)"; \
	  [ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV) || exit 1; \
	  $(VENV)/bin/pip install -q --upgrade pip && \
	  $(VENV)/bin/pip install -q -e '.[dev,text]' && \
	  echo "$$want" > $(VENV)/.pyproject.sha256; \
	fi

# check-params and `verify --lock-only` name a bad params.yaml or dvc.lock in one line (DVC's own error does not).
# DVC refuses a second `dvc repro` in a checkout while one runs a stage (its "busy" rwlock); its error goes
# through tee (stdout untouched) so that the refusal ends with one plain line saying why. --wait-for-lock: DVC
# lets go of its repo lock while a stage runs and must take it back after; waiting for it there (instead of
# failing after 3 s) keeps a run from failing because another dvc command holds it for a moment.
run: venv
	kdpipe check-params
	kdpipe verify --lock-only
	@set -o pipefail; err=$$(mktemp); echo "dvc --wait-for-lock repro"; \
	{ dvc --wait-for-lock repro 2>&1 1>&3 | tee "$$err" >&2; } 3>&1; rc=$$?; \
	if [ $$rc -ne 0 ] && grep -qE "Unable to acquire lock|is busy, it is being blocked by" "$$err"; then \
	  echo "kdpipe: another dvc command is running in this checkout (.dvc/tmp/lock); wait for it or stop it" >&2; \
	fi; rm -f "$$err"; [ $$rc -ne 0 ] || kdpipe outcome; exit $$rc

# CPU_PROFILE=avx2 (test, test-fast, bench-speed): torch's CPU kernels capped at AVX2, as on an x86-64 CPU without
# AVX-512 (and so without native bf16: precision auto is fp32 there). The variables: kdpipe/run/kernels.py PROFILES.
CPU_PROFILE ?= native
PROFILE_ENV = prof=$$(python -c "import sys; from kdpipe.run.kernels import PROFILES as P, env_line; p = sys.argv[1]; \
  print(env_line(P[p])) if p in P else sys.exit(f'CPU_PROFILE={p}: unknown; one of {\", \".join(P)}')" $(CPU_PROFILE)) \
  && echo "CPU profile $(CPU_PROFILE): $${prof:-no caps}" && env $$prof

# Two pytest workers: tests train on one thread each, so the second worker uses the second core (tests/conftest.py
# keeps the tests that share a module fixture, and all tests on the shared DVC repo, on one worker).
# test: everything but the end-to-end tier (e2e: through a Prefect server and workers, a schedule, an MLflow server,
# torch.distributed ranks, racing pipelines, two CPU profiles); test-e2e: that tier; .ci/run runs both;
# test-fast: neither e2e nor the other tests that run real stages (slow). docs/development.md lists the tiers.
PYTEST_WORKERS ?= 2
PYTEST = @$(PROFILE_ENV) python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup
test: venv
	$(PYTEST) -m "not e2e"

test-e2e: venv
	$(PYTEST) -m e2e

test-fast: venv
	$(PYTEST) -m "not slow and not e2e"

# `kdpipe store` first: a checkout moved or copied since its runs were logged gets its artifact paths pointed here.
ui: venv
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlflow.db kdpipe store
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# The champion student behind MLflow's REST scoring server (POST /invocations; docs/shipping.md), loopback only.
# ALIAS=candidate serves the latest export when the gate crowned none; `kdpipe resolve` says in one line why
# there is no version with the alias (MLflow's own answer is a traceback).
SERVE_PORT ?= 5001
ALIAS ?= champion
serve: venv
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlflow.db kdpipe store
	@MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlflow.db kdpipe resolve models:/kdpipe-student@$(ALIAS)
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlflow.db mlflow models serve -m models:/kdpipe-student@$(ALIAS) \
	  --env-manager local --host 127.0.0.1 --port $(SERVE_PORT)

# The repo's store as a tracking server (artifacts served through it), on loopback only: reach it from elsewhere
# through an SSH tunnel or a proxy that authenticates. Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
.PHONY: mlflow-server
mlflow-server: venv
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlflow.db kdpipe store
	mlflow server --host 127.0.0.1 --port 5000 --workers 1 \
	  --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --serve-artifacts --artifacts-destination $(CURDIR)/mlartifacts

lint: venv
	ruff check kdpipe tests flows bench

bench-quality: venv
	python bench/quality.py

bench-curriculum: venv
	python bench/quality.py --curriculum

bench-views: venv
	python bench/quality.py --views

# Photo augmentation: batched resized_crop against torchvision per sample (augment.json), then the Fashion-MNIST
# students with resized_crop against pad_crop (augment_quality.json; trains the quality teacher if missing).
bench-augment: venv
	python bench/augment.py
	python bench/photo_epoch.py
	python bench/quality.py --augment

bench-methods: venv
	python bench/quality.py --methods

bench-recipes: venv
	python bench/quality.py --recipes

# 70,000 Fashion-MNIST PNGs streamed from disk vs 10,000 and vs in memory (bench/streaming.py); 1 vs 2
# data-parallel processes (bench/distributed.py). Each alone on the machine: they time things.
bench-streaming: venv
	python bench/streaming.py

bench-distributed: venv
	python bench/distributed.py

# Speed against torchdistill (bench/speed.py), what `make run` costs beyond the stages' own work
# (bench/overhead.py) and the distill stage's peak memory on Fashion-MNIST's 60k images (bench/memory.py), one
# after the other (timings taken side by side slow each other); the bench extra (torchdistill) on first use.
bench-speed: venv
	@pip show -q torchdistill >/dev/null 2>&1 || pip install -q -e '.[bench]'
	python bench/speed.py --cpu-profile $(CPU_PROFILE)
	python bench/overhead.py
	python bench/memory.py

# Prefect (flows/, prefect.yaml) and DVC remotes. `make prefect-server` in one terminal, then, with the same
# PREFECT_API_URL everywhere:
#   export PREFECT_API_URL=http://127.0.0.1:4200/api; make deploy     # registers; workers clone origin's branch
#   make worker                     # on each machine that should run flows (LIMIT=1 runs at once by default)
# On one machine that is all: with no DVC remote, make deploy adds a folder outside the checkout as this checkout's
# remote (.dvc/config.local; KDPIPE_DVC_REMOTE picks the folder) and, with no git `origin`, workers clone this
# checkout. For workers on other machines, once per repository: `make remote REMOTE=<url>`, commit .dvc/config.
.PHONY: prefect-server deploy bench-flow remote worker

prefect-server: venv
	prefect server start --host 127.0.0.1 --port 4200

deploy: venv
	@python -c "from prefect.settings import PREFECT_API_URL as u; raise SystemExit(0 if u.value() else \
	  'make deploy: set PREFECT_API_URL first, e.g. http://127.0.0.1:4200/api (see make prefect-server)')"
	@python -m flows.source check-remote
	prefect work-pool inspect kdpipe-process >/dev/null 2>&1 || prefect work-pool create kdpipe-process --type process
	prefect --no-prompt deploy --all

bench-flow: venv
	python bench/flow_overhead.py

# The default DVC remote, named "store", in .dvc/config (committed, so clones and workers have it); credentials
# belong in .dvc/config.local (`dvc remote modify --local store ...`), never in the committed file.
remote: venv
	@[ -n "$(REMOTE)" ] || { echo "make remote: set REMOTE to a URL or a folder, e.g. make remote REMOTE=s3://bucket/kdpipe" >&2; exit 2; }
	dvc remote add --default --force store '$(REMOTE)'
	@echo "default DVC remote: store -> $$(dvc config remote.store.url); commit .dvc/config, then dvc push"

# A worker of the process pool: each flow run clones the repository into a temporary folder (prefect.yaml's pull
# steps), so start it anywhere. LIMIT runs at once (default 1: one GPU, and sweep points spread over workers);
# NAME names it in the UI. Runs log to MLFLOW_TRACKING_URI when set here: give every worker the same, shared store.
worker: venv
	@python -c "from prefect.settings import PREFECT_API_URL as u; raise SystemExit(0 if u.value() else \
	  'make worker: set PREFECT_API_URL first, e.g. http://127.0.0.1:4200/api (the server the deployments are on)')"
	prefect worker start --pool kdpipe-process --limit $(or $(LIMIT),1) $(if $(NAME),--name '$(NAME)')
