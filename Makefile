# The same commands run locally and in CI.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test check bench soak clean browser fuzz

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
	env FOREWARN_WRITE_KEY=$(WRITE_KEY) FOREWARN_ADMIN_KEY=$(ADMIN_KEY) $(VENV)/bin/forewarn demo --dir forewarn-demo

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

# every benchmark (about an hour and a half on 2 cores, most of it the 100k-account backtest); JSON and a
# summary in bench/results/ (not committed). BENCH_ARGS=--quick for a smoke run of a few minutes.
bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH_ARGS)

# 10 minutes of steady ingest against a real server: errors, memory and latency over time
soak: $(STAMP)
	$(PY) bench/soak.py

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
