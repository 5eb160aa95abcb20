# Two commands on a fresh clone:  `make demo` (talk to a real model)  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# smollm2 is a 135M model: a short, simple question gets a sensible answer from it at the default
# sampling settings (a broad or open-ended one can ramble); DEMO_FLAGS passes `ownlm run` options
PROMPT     ?= In one sentence, what is a language model?
DEMO_FLAGS ?=

.PHONY: setup demo test fuzz bench clean

# two install sets, each with its stamp: `demo` gets what running needs, `test` adds the test tools
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	# torch pinned here (a bare `torch` pulls a multi-GB CUDA build); pyproject says torch>=2.5
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(TEST_STAMP)

demo: $(RUN_STAMP)
	$(BIN)/ownlm pull smollm2
	$(BIN)/ownlm run smollm2 $(DEMO_FLAGS) "$(PROMPT)"

test: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/python -m pytest -q -ra

# the fuzzers for longer than the suite runs them, with a new seed; failures land in tests/fuzz/crashes/
fuzz: setup
	$(BIN)/python -m tests.fuzz.harness --cases $${CASES:-5000}

bench: setup
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
