# ProxMO-Ray. `make setup` once, then `make run` / `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PROXMO := $(VENV)/bin/proxmo
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test test-all test-faults test-gpu lint bench k8s-validate clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

## The main job on embedded defaults: local Ray, embedded redis-server, vLLM CPU, tiny model.
run: setup
	$(PROXMO) train --config deploy/configs/quickstart.yaml $(ARGS)

## The default suite: unit + integration (real Redis, real Ray, real vLLM CPU engine). Minutes.
test: setup
	$(PY) -m pytest -q -m "not slow and not gpu and not faults" tests

test-all: setup
	$(PY) -m pytest -q -m "not gpu" tests

test-faults: setup
	$(PY) -m pytest -q -s --tb=native -m faults tests  # -s: each test prints its counts; native tracebacks (pytest's own formatter crashed on a deep py4j one)

test-gpu: setup
	$(PY) -m pytest -q -m gpu tests/gpu

lint: setup
	$(VENV)/bin/ruff check proxmo services tests

bench: setup
	$(PROXMO) bench all

k8s-validate: setup
	$(PY) -m services.k8s_validate k8s

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
