# `make test` on a fresh machine: creates .venv, installs torch (a CUDA build where pip offers one, so the CUDA
# sources compile even without a GPU), builds the extension, and runs the tests (Triton on the CPU through its
# interpreter). .ci/run calls exactly this.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu) setup.py pyproject.toml

.PHONY: test install demo bench-quick clean

test: $(VENV)/.built
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

install: $(VENV)/.built

# The program's main job on a fresh clone: train a small translator on an embedded task, no download.
demo: $(VENV)/.built
	$(VENV)/bin/fastseq2seq demo

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch numpy setuptools wheel ninja pytest expecttest
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(PY) -m fastseq2seq info
	touch $@

# The whole benchmark suite in its smoke form (small shapes, few repeats, no torch.compile): under 2 minutes on
# 2 CPU cores. The full suite: $(VENV)/bin/fastseq2seq bench [--device cuda] --out DIR (README, "Performance").
bench-quick: $(VENV)/.built
	$(VENV)/bin/fastseq2seq bench --quick --out bench-results/quick

clean:
	rm -rf build fastseq2seq/*.so $(VENV)
