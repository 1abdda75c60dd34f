# `make run` starts one replica on 127.0.0.1:3000; `make test` runs the test suite.
# Both create .venv and install the package (compiling the Cython relay) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := pyproject.toml setup.py $(wildcard _relay/*.pyx _relay/*.pxd _relay/*.pxi)

.PHONY: run test lint bench wheel clean

$(VENV)/.installed: $(SOURCES)
	sh scripts/bootstrap.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/coordinator server

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check coordinator tests scripts
	$(VENV)/bin/cython-lint _relay/*.pyx _relay/*.pxd _relay/*.pxi

bench: $(VENV)/.installed
	$(PY) scripts/bench_relay.py

wheel: $(VENV)/.installed
	$(PY) -m pip wheel --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info _relay/*.c _relay/*.so $(VENV)
