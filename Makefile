# `make run`: install, load the sample corpus, backfill, show status and a search, start the UI.
# `make test`: lint and the test suite (real RabbitMQ/PostgreSQL, embedded montydb/qdrant).
# `make bench`: the benchmarks of BENCHMARKS.md.
# `make eval`: retrieval quality (recall@5, MRR) on eval/corpus.jsonl, ours against a naive pipeline.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CLI := $(BIN)/llm-twin-features

export LLM_TWIN_DATA_DIR ?= $(CURDIR)/.data
export DAGSTER_HOME ?= $(LLM_TWIN_DATA_DIR)/dagster_home
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test lint bench bench-scale eval ui clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: anything else pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

run: install $(DAGSTER_HOME)/dagster.yaml
	$(CLI) ingest --no-publish llm_twin_features/sample_data/corpus.jsonl
	# No run server left behind (cli/run_server.py): `dev` below starts the stack.
	RUN_SERVER_IDLE_SECONDS=0 $(CLI) backfill
	$(CLI) status
	$(CLI) search "how do I keep a vector database in sync with MongoDB?" --limit 3
	$(CLI) dev --port 3000

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(CLI) dev --port 3000

# Style, the import contracts (pyproject.toml), types, and the definitions as Dagster loads them.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	home=$$(mktemp -d) && touch $$home/dagster.yaml && \
		VIRTUAL_ENV=$(CURDIR)/$(VENV) DAGSTER_HOME=$$home $(BIN)/dg check defs

# The venv's tools (hadolint, compose) first on PATH: the deployment tests call them.
test: install lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

bench: install
	$(BIN)/python bench/run.py

# `make bench-scale`: the platform at 1x/5x/20x the bench corpus (1-layer stand-in model) and the
# model server under 1/2/4 concurrent clients (~18 min); not part of `make test`.
bench-scale: install
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/model_server_load.py

eval: install
	$(BIN)/python eval/run.py --naive

clean:
	rm -rf .data bench/.work eval/.work
