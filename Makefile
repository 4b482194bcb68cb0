# Every target does its own set-up: a fresh clone needs only python3 (>=3.10) and make.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# CPU build of torch first and pinned, so no resolver ever pulls a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test bench clean lint

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev]"
	rm -f $(VENV)/.installed-*; touch $@

demo: install
	$(BIN)/zoospectra demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench.run_bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
