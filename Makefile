# Two commands do everything on a fresh machine with Python 3 and make:
#   make demo   create the environment, run a 4-rank training job, resume it on 2 ranks
#   make test   create the environment and run every test (lint, unit, TF oracle, MPI, S3)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_STAMP := $(VENV)/.demo-stamp
# PyTorch's CPU build for the framework tests: this workplace keeps the 2.13.0 CPU wheel on
# disk; elsewhere plain PyPI's torch is a CUDA build of several GB, so point TORCH_SPEC at
# a CPU build (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu").
TORCH_SPEC ?= torch==2.13.0
DEMO   ?= /tmp/shardsave-demo

.PHONY: all env demo seeds test lint fuzz bench bench-peers clean

all: test

# the demo needs only the package and MPICH; the tests need the rest too
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[mpi]'
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install --quiet --no-compile $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test,s3,mpi,frameworks]'
	touch $(STAMP)

env: $(STAMP)

seeds: $(DEMO_STAMP)
	rm -rf $(DEMO)/seed && mkdir -p $(DEMO)/seed
	$(BIN)/python examples/save_model.py $(DEMO)/seed/model.ckpt
	$(BIN)/python examples/restore_model.py $(DEMO)/seed/model.ckpt
	$(BIN)/python examples/restore_subset.py $(DEMO)/seed/model.ckpt
	$(BIN)/python examples/inspect_model.py $(DEMO)/seed/model.ckpt

demo: $(DEMO_STAMP) seeds
	rm -rf $(DEMO)/run $(DEMO)/straight
	@echo "== 4 ranks train 100 steps, checkpointing every 20"
	$(BIN)/mpiexec -n 4 $(BIN)/python -m mpi4py examples/mpi_train.py --ckpt-dir $(DEMO)/run --steps 100 --save-every 20
	@echo "== 2 ranks resume from the latest checkpoint and train to step 200"
	$(BIN)/mpiexec -n 2 $(BIN)/python -m mpi4py examples/mpi_train.py --ckpt-dir $(DEMO)/run --steps 200 --save-every 20 --resume
	@echo "== the same 200 steps straight on 1 rank, for comparison (same sha256 expected)"
	$(BIN)/mpiexec -n 1 $(BIN)/python -m mpi4py examples/mpi_train.py --ckpt-dir $(DEMO)/straight --steps 200 --save-every 200
	$(BIN)/shardsave ls $(DEMO)/run
	$(BIN)/shardsave inspect $(DEMO)/run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# A long fuzz campaign on index parsing and restore (tests/fuzz/): FUZZ_MINUTES of random
# crafted checkpoints; prints the cases tried and every distinct finding, saved as a case
# file under FUZZ_OUT (replay: python -m tests.fuzz.replay FILE); fails on any finding.
# FUZZ_TARGET: another source tree whose shardsave the workers import.
FUZZ_MINUTES ?= 20
FUZZ_OUT     ?= fuzz-findings
FUZZ_TARGET  ?= $(CURDIR)
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz.campaign --minutes $(FUZZ_MINUTES) --out $(FUZZ_OUT) --target $(FUZZ_TARGET)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# PyTorch DCP and Orbax for side-by-side figures, in their own environment (run.py uses it
# when present). torch is pinned to the CPU build this workplace keeps on disk; elsewhere
# PyPI's torch is several GB. jax from PyPI is CPU-only (jaxlib, no CUDA plugin).
bench-peers:
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/python -m pip install --quiet torch==2.13.0 numpy
	.venv-peers/bin/python -m pip install --quiet orbax-checkpoint jax jaxlib

clean:
	rm -rf $(VENV) .venv-peers $(DEMO)
