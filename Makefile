# One venv, two commands: `make demo` and `make test`; `make smoke` between them.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU build of torch; pip finds it on local disk here and on PyPI's CPU index elsewhere.
TORCH   ?= torch==2.13.0

.PHONY: demo smoke test bench lint venv install install-test fixtures clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e ".[test]" --config-settings editable_mode=compat
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	@echo "== loratool inspect on the shipped fixtures =="
	$(BIN)/loratool inspect fixtures/sd15_kohya_locon.safetensors fixtures/sdxl_kohya_lora.safetensors fixtures/sdxl_peft
	@echo "== loratool convert kohya -> diffusers, verified =="
	rm -rf /tmp/loratool-demo && mkdir -p /tmp/loratool-demo
	$(BIN)/loratool convert fixtures/sdxl_kohya_lora.safetensors --to diffusers -o /tmp/loratool-demo/sdxl_diffusers.safetensors
	$(BIN)/loratool inspect /tmp/loratool-demo/sdxl_diffusers.safetensors

# Every CLI command end to end (tests/smoke.py). Right after `make demo` the venv holds only
# the runtime dependencies, so one that is missing fails here; SMOKE_ARGS=--runtime-only
# refuses to run in a venv that has test extras (as .ci/run does).
smoke: install
	$(BIN)/python tests/smoke.py $(SMOKE_ARGS)

test: install-test
	$(BIN)/ruff check loratool tests bench fixtures
	$(BIN)/python -m pytest

bench: install-test
	$(BIN)/python -m bench

fixtures: install-test
	$(BIN)/python fixtures/generate.py

clean:
	rm -rf $(VENV) build *.egg-info bench/_data
