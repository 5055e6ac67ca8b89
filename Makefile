# Every target builds what it needs from nothing: a venv, then `pip install -e .[dev]`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean sample test-interop install-interop

install: $(STAMP)

$(STAMP): pyproject.toml setup.py qtool/core/_kernels.c qtool/core/_kernels.h \
		qtool/core/_fit.h qtool/core/_fit.c qtool/core/_fit_long.c
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
	$(BIN)/ruff check qtool tests tests_interop bench

bench: install
	$(BIN)/python bench/run.py

sample: install
	$(BIN)/python sample_weights/make_sample.py

# The interop tier (tests_interop/) checks exports against the real clients: torch, transformers
# and compressed-tensors, in a venv of its own so that `make test` stays free of torch.
# torch is installed first and alone, pinned: it is the CPU build on these machines, and with it
# in place nothing later pulls a (multi-GB) CUDA build.
IVENV  := .venv-interop
IBIN   := $(IVENV)/bin
ISTAMP := $(IVENV)/.installed

install-interop: $(ISTAMP)

$(ISTAMP): pyproject.toml setup.py qtool/core/_kernels.c qtool/core/_kernels.h \
		qtool/core/_fit.h qtool/core/_fit.c qtool/core/_fit_long.c
	$(PYTHON) -m venv $(IVENV)
	$(IBIN)/pip install -q --upgrade pip
	$(IBIN)/pip install -q torch==2.13.0
	$(IBIN)/pip install -q transformers==5.24.0 compressed-tensors==0.20.1 -e '.[dev]'
	$(IBIN)/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
		|| { echo "torch in $(IVENV) is not the CPU build"; exit 1; }
	touch $(ISTAMP)

test-interop: install-interop
	$(IBIN)/python -m pytest tests_interop

clean:
	rm -rf $(VENV) $(IVENV) demo_out demo_restored.safetensors .pytest_cache .hypothesis
