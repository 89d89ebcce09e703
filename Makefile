# Two commands do everything on a fresh clone: `make sample` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch 2.13.0 is the CPU build available on this machine; any other version drags in CUDA.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install sample test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[train,dev]"
	touch $(STAMP)

sample: $(STAMP)
	$(BIN)/llama2nb sample

# The suite in one process per core (pytest-xdist), sharing Numba's disk cache (saves are locked:
# llama2nb/numba_cache.py); TEST_JOBS=0 runs it in this process.
TEST_JOBS ?= auto

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile

bench: $(STAMP)
	$(BIN)/llama2nb bench $(if $(RUNC),--runc $(RUNC)) $(if $(RUNQ),--runq $(RUNQ)) $(BENCHFLAGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
