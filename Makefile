# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test coverage test-export llama-cpp clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, from the pinned file, so nothing pulls a CUDA build on a CPU machine.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/graft run workflows/demo.toml

# Installs llama.cpp for the GGUF export tests only if `make llama-cpp` cached it (else those tests skip).
test: setup
	$(BIN)/python -m export.llama_cpp install --if-cached
	$(BIN)/python -m pytest -q -rs tests

# The same suite with line coverage (pyproject.toml [tool.coverage.run]): a table, and runs/coverage.json.
coverage: setup
	mkdir -p runs
	$(BIN)/python -m export.llama_cpp install --if-cached
	$(BIN)/python -m pytest -q -rs --cov --cov-report=term --cov-report=json:runs/coverage.json tests

# The llama.cpp pinned in export/llama_cpp.py: its converter and the llama-cpp-python wheel built from the
# same sdist, cached in .cache/ (kept by `make clean`; the build takes minutes once, see docs/export.md).
llama-cpp: setup
	$(BIN)/pip install --quiet -e '.[dev,export]'
	$(BIN)/python -m export.llama_cpp install

test-export: llama-cpp
	GRAFT_REQUIRE_LLAMA_CPP=1 $(BIN)/python -m pytest -q -rs tests/test_export_gguf.py tests/test_export_gguf_bytelevel.py

clean:
	rm -rf $(VENV) runs
