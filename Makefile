# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cherrytop pipeline --preset tiny

test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -m slow

clean:
	rm -rf $(VENV) runs
