# Two commands set everything up on a fresh machine with Python 3.11:
#   make demo   virtual environment + install + synthetic IEMOCAP + train MulT and CausalMER + evaluate
#   make test   virtual environment + install + the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependency list changes. torch is pinned (2.13.0): pip takes the CPU wheel where
# one is provided locally, and the CUDA build of the same version from the registry elsewhere.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python main.py demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest

clean-demo:
	rm -rf data/synthetic checkpoints/iemocap/demo_mult checkpoints/iemocap/demo_causalmer
