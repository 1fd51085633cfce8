# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/imgindex: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[cpu,dev]'
	touch $@

.PHONY: setup demo test clean
setup: $(BIN)/imgindex

demo: setup
	$(BIN)/imgindex demo --out demo-out

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out
