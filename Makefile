# Two commands on a fresh clone:  `make demo` (talk to a real model)  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROMPT ?= In one sentence, why would someone run a language model on their own computer?

.PHONY: setup demo test fuzz bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned here (a bare `torch` pulls a multi-GB CUDA build); pyproject says torch>=2.5
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/ownlm pull smollm2
	$(BIN)/ownlm run smollm2 "$(PROMPT)"

test: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/python -m pytest -q -ra

# the fuzzers for longer than the suite runs them, with a new seed; failures land in tests/fuzz/crashes/
fuzz: setup
	$(BIN)/python -m tests.fuzz.harness --cases $${CASES:-5000}

bench: setup
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
