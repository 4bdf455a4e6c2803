# Every target installs what it needs into .venv inside the repository.
#
# TORCH_SPEC picks the torch build. The default is the CPU release that the
# CI machines keep on disk. To use another build, for example CUDA, run
#   make test TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url URL"
# with URL taken from the PyTorch install selector, or install torch into
# .venv yourself first: an installed torch is kept as it is.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PIP := $(VENV)/bin/python -m pip
STAMP := $(VENV)/.lowmem-moe-installed

.PHONY: install demo test bench bench-peer clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -c constraints.txt -e ".[test,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m lowmem_moe.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) .cache demo-output benchmarks/work

# Benchmarks write into benchmarks/work/ (ignored by git) and regenerate
# benchmarks/RESULTS.md from the JSON files in benchmarks/results/.
# sentencepiece is needed by llama.cpp's convert_hf_to_gguf.py, which
# `make bench` runs as a downstream check.
bench: $(STAMP)
	$(PIP) install -r benchmarks/requirements.txt
	$(VENV)/bin/python -m benchmarks.run_bench

# mergekit-moe gets a virtual environment of its own, with the same torch
# build installed first so that pip does not pull a CUDA build.
PEER_VENV := benchmarks/work/peer-venv
MERGEKIT_SPEC ?= mergekit==0.1.5
PEER_STAMP := $(PEER_VENV)/.mergekit-installed

$(PEER_STAMP):
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -c "import torch" 2>/dev/null || $(PEER_VENV)/bin/python -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PEER_VENV)/bin/python -m pip install "$(MERGEKIT_SPEC)"
	touch $(PEER_STAMP)

bench-peer: $(STAMP) $(PEER_STAMP)
	$(VENV)/bin/python -m benchmarks.peer
