# Two commands do everything: `make demo` (set up + protect the example photos with the shipped
# weights) and `make test` (set up + run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/cgan protect examples/photos --out demo-out
	@echo "Protected copies and manifest.jsonl are in demo-out/"

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf demo-out .pytest_cache
