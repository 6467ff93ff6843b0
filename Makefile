# Two entry points a newcomer needs; each builds the virtual environment it runs in.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch==2.13.0 first: the CPU build on this machine's disk, so `transformers` pulls no CUDA wheels.
# open_clip (the reference for its towers' import/export tests) without its dependencies: the torchvision it
# requires does not load against this torch, and the tests stand in for the few names it imports.
$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,torch]"
	$(BIN)/pip install --quiet --no-deps open_clip_torch==3.3.0
	touch $@

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

demo: $(VENV)/.installed
	$(BIN)/clipup-demo --workdir out/demo --force

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 -q

bench: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) out
