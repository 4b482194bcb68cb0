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

# ruff over everything we write; mypy over the installed package (config: pyproject.toml). mypy sees
# the package through build/typecheck/zoospectra, a symlink tree with the installed layout (why:
# pyproject's [tool.mypy]); sed turns its paths back into source paths. `python -m` rather than
# $(BIN)/ruff: the same tool, and it also runs from a venv that borrows another's site-packages.
LINKTREE := build/typecheck/zoospectra
lint: install
	$(BIN)/python -m ruff check pipeline jobs schemas tests bench
	rm -rf $(LINKTREE) && mkdir -p $(LINKTREE)
	for f in pipeline/*; do ln -s ../../../$$f $(LINKTREE)/; done
	ln -s ../../../schemas ../../../jobs $(LINKTREE)/
	bash -o pipefail -c '$(BIN)/python -m mypy | sed -e "s|^$(LINKTREE)/schemas/|schemas/|; s|^$(LINKTREE)/jobs/|jobs/|; s|^$(LINKTREE)/|pipeline/|"'

bench: install
	$(BIN)/python -m bench.run_bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
