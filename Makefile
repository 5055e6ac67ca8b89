# Every target builds what it needs from nothing: a venv, then `pip install -e .[dev]`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean sample

install: $(STAMP)

$(STAMP): pyproject.toml setup.py qtool/core/_kernels.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	rm -rf demo_out demo_restored.safetensors
	$(BIN)/qtool quantize sample_weights/sample.safetensors demo_out --scheme gnmt
	$(BIN)/qtool dequantize demo_out demo_restored.safetensors
	$(BIN)/qtool report demo_out

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check qtool tests bench

bench: install
	$(BIN)/python bench/run.py

sample: install
	$(BIN)/python sample_weights/make_sample.py

clean:
	rm -rf $(VENV) demo_out demo_restored.safetensors .pytest_cache .hypothesis
