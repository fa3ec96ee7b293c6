# Quickstart targets. Each builds its virtual environment on first use: torch first (the CPU
# wheel when the machine has one), then megatron-core, then megasparse in editable mode.
#   make demo                 TP=2 sparse training demo on CPU (gloo)
#   make test                 the test suite (CPU; GPU tests skip without CUDA)
#   make test MCORE=0.19.2    the same against megatron-core 0.19.2 (own venv)
#   make gpu-check            on a CUDA GPU: everything only a GPU can prove (gpu tests, kernel
#                             bandwidth, bench beside the projection, cuSPARSELt/FP8 smoke), under
#                             8 minutes; writes $(GPU_CHECK_OUT)/gpu_check.json and .md. No GPU: exits 0

PYTHON ?= python3
TORCH ?= torch==2.13.0
MCORE ?= 0.16.1
VENV ?= .venv-mcore$(MCORE)
DEMO_ARGS ?=
PYTEST_ARGS ?= -q
GPU_CHECK_OUT ?= gpu_check_out

# megatron-core 0.17+ declares Python >= 3.12 but runs on 3.11; its deps (torch, numpy, packaging)
# come from the other two installs (megasparse depends on numpy and packaging).
ifeq ($(MCORE),0.16.1)
MCORE_INSTALL = megatron-core==$(MCORE)
else
MCORE_INSTALL = --ignore-requires-python --no-deps megatron-core==$(MCORE)
endif

STAMP = $(VENV)/.megasparse-installed

.PHONY: demo test gpu-check env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check $(TORCH)
	$(VENV)/bin/pip install -q --disable-pip-version-check $(MCORE_INSTALL)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python -m megasparse.tools.demo $(DEMO_ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

gpu-check: $(STAMP)
	$(VENV)/bin/python -m megasparse.tools.gpu_check --json $(GPU_CHECK_OUT)/gpu_check.json --md $(GPU_CHECK_OUT)/gpu_check.md

clean:
	rm -rf .venv-mcore* *.egg-info
