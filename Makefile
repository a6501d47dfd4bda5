# The same commands run locally and in CI.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test check bench clean browser fuzz

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

EXAMPLE := --playbooks examples/playbooks --events examples/events --until 2026-12-31T00:00:00Z
# keys for trying Forewarn out on this machine; set your own for anything else
WRITE_KEY ?= fw_wk_local-write-key-change-me
ADMIN_KEY ?= fw_ak_local-admin-key-change-me

run: $(STAMP)
	$(VENV)/bin/forewarn check examples/playbooks | tail -n 1
	$(VENV)/bin/forewarn replay $(EXAMPLE) --format table
	@echo "write key (Segment Basic-auth user, PostHog api_key, Sentry DSN key): $(WRITE_KEY)"
	@echo "admin key (Authorization: Bearer ... on /api/v1): $(ADMIN_KEY)"
	@echo "demo app with the widget: http://127.0.0.1:8750/demo/"
	env FOREWARN_WRITE_KEY=$(WRITE_KEY) FOREWARN_ADMIN_KEY=$(ADMIN_KEY) FOREWARN_KB=examples/kb $(VENV)/bin/forewarn serve --db forewarn.db --playbooks examples/playbooks

test: $(STAMP) browser
	$(PY) -m pytest -q

# The browser tests drive Debian's Chromium; install it where this machine lets us (root with
# apt). Where it cannot be installed, those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium is not installed and could not be: the browser tests will be skipped"

check: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -q tests/test_layers.py

bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/ingest.py
	$(PY) bench/outreach.py
	$(PY) bench/widget.py

# Longer fuzzing than the suite's short runs: schemathesis against a running server (every
# check, the stateful phase) and atheris on each parser of untrusted text. A failure prints the
# input that caused it.
FUZZ_EXAMPLES ?= 300
FUZZ_SECONDS  ?= 300
fuzz: $(STAMP)
	$(PY) -m tests.fuzz.api_run --max-examples $(FUZZ_EXAMPLES)
	$(PY) -m tests.fuzz.targets --all $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
