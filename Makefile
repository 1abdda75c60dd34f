# `make run` starts one replica on 127.0.0.1:3000 (installing only what a replica needs); `make test` runs the
# whole test suite (adding the test and build tools). Both create .venv and install the package (compiling
# the Cython relay) on first use, saying so.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
SOURCES := pyproject.toml setup.py $(wildcard _relay/*.pyx _relay/*.pxd _relay/*.pxi)

# Also run on every other PostgreSQL build here (pgserver's 16, Debian's 15), before the whole suite
# on the embedded mode's own (18).
PG_AGAIN := tests/test_db.py tests/test_pubsub.py tests/test_replicas.py tests/test_controlplane.py

.PHONY: run test lint bench wheel clean

# What a replica needs: the package (compiling the Cython relay) and its dependencies. `make run` stops here.
$(VENV)/.installed-run: $(SOURCES)
	@echo "==> checking system packages (scripts/bootstrap.sh build)"
	@sh scripts/bootstrap.sh build
	@test -x $(PY) || { echo "==> creating the virtual environment $(VENV)"; python3 -m venv $(VENV); }
	@echo "==> installing the build tools into $(VENV): pip, setuptools, Cython"
	$(PIP) install -U pip 'setuptools>=77' 'cython>=3.0'
	@echo "==> installing coordinator (editable) with what a replica needs;"
	@echo "    this compiles the Cython relay (_relay/*.pyx -> C -> .so): about a minute on 2 cores"
	$(PIP) install --no-build-isolation -e .
	@touch $@
	@echo "==> installed: $(VENV)/bin/coordinator"

# Everything else works on: the test and build tools (pyproject's `test` extra, read from there, so the
# package is not rebuilt), and the repository root on the venv's path, where the scripts find testkit/.
$(VENV)/.installed: $(VENV)/.installed-run pyproject.toml
	@echo "==> installing the test and build tools into $(VENV) (pytest, selenium, auditwheel, ...)"
	$(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]))' > $(VENV)/test-requirements.txt
	$(PIP) install -r $(VENV)/test-requirements.txt
	$(PY) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_path("purelib"), "coordinator-testkit.pth").write_text("$(CURDIR)\n")'
	@touch $@

run: $(VENV)/.installed-run
	@echo "==> starting one replica on http://127.0.0.1:3000 (embedded PostgreSQL; status page at /status,"
	@echo "    log in with the token that '$(VENV)/bin/coordinator api-token' prints); Ctrl-C stops it"
	$(VENV)/bin/coordinator server

test: $(VENV)/.installed
	@echo "==> checking what the tests drive: nginx, chromium, kubectl, systemd-analyze (scripts/bootstrap.sh test)"
	@sh scripts/bootstrap.sh test
	@for bindir in $$($(PY) -m testkit.pgcluster 2>/dev/null); do \
		echo "==> the database tests on $$($$bindir/postgres --version) ($$bindir)"; \
		COORDINATOR_TEST_PG_BINDIR=$$bindir $(PY) -m pytest $(PG_AGAIN) || exit 1; \
	done
	@echo "==> running the test suite (on the embedded mode's PostgreSQL)"
	$(PY) -m pytest

# The venv's tools, found by name: cython-lint starts pycodestyle from PATH, which need not have it.
# abspath: VENV may be relative or absolute.
LINT_PATH := $(abspath $(VENV))/bin:$(PATH)

lint: $(VENV)/.installed
	PATH="$(LINT_PATH)" ruff check coordinator tests scripts testkit
	PATH="$(LINT_PATH)" cython-lint _relay/*.pyx _relay/*.pxd _relay/*.pxi
	PATH="$(LINT_PATH)" lint-imports
	PATH="$(LINT_PATH)" mypy
	@# grimp reads .py files only: the compiled data plane is checked here (see [tool.importlinter]).
	@if grep -nE '^\s*(c?import|from)\s+coordinator\b' $(wildcard _relay/*.py*) $(wildcard _relay/*.pxi); then \
		echo "lint: _relay (the data plane) must not import coordinator"; exit 1; fi

bench: $(VENV)/.installed
	$(PY) scripts/bench_relay.py

# A manylinux wheel in dist/: built from the sdist, then repaired by auditwheel.
wheel: $(VENV)/.installed
	rm -rf dist/raw
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m build --no-isolation --outdir dist/raw .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m auditwheel repair -w dist dist/raw/*.whl
	mv dist/raw/*.tar.gz dist/ && rm -rf dist/raw
	@ls -l dist

clean:
	rm -rf build dist *.egg-info _relay/*.c _relay/*.so $(VENV)
