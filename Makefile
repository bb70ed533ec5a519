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
	@# Browser tests drive Debian's Chromium through Playwright (no browser download).
	command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null || \
	  (apt-get update -q && apt-get install -y -q chromium >/dev/null) || \
	  echo "warning: install Debian's chromium (apt-get install chromium) for the browser tests"
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
