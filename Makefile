# The same commands run locally and in CI.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test check bench soak clean browser fuzz compiled test-compiled compiled-checks

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

# The optional compiled build (setup.py): the hot modules compiled with mypyc into a wheel,
# installed (never editable) in a venv of its own and rebuilt when a source changes. About a
# minute of compiling; needs a C compiler and Python's headers. Run the benchmarks with it as
# .venv-compiled/bin/python bench/engine.py. The dependencies go in first: mypyc type-checks
# against them as mypy does.
CVENV  := .venv-compiled
CPY    := $(CVENV)/bin/python
CDEPS  := $(CVENV)/.deps
CSTAMP := $(CVENV)/.installed
WHEELS := build/compiled

$(CDEPS): pyproject.toml
	python3 -m venv $(CVENV)
	$(CPY) -m pip install --quiet --upgrade pip 'setuptools>=68' wheel
	$(CPY) -m pip install --quiet '.[dev]'
	touch $(CDEPS)

$(CSTAMP): $(CDEPS) setup.py $(wildcard src/forewarn/*.py)
	rm -rf $(WHEELS) build/lib.* build/temp.*
	FOREWARN_COMPILE=1 $(CPY) -m pip wheel --quiet --no-deps --no-build-isolation -w $(WHEELS) .
	$(CPY) -m pip install --quiet --force-reinstall --no-deps $(WHEELS)/forewarn-*.whl
	touch $(CSTAMP)

compiled: $(CSTAMP)

# The core's tests against the compiled build, and a replay of a 100,000-event synthetic stream
# that must print exactly what the pure-Python build prints. Skipped, saying why, where nothing
# can compile.
CORE_TESTS := tests/test_conditions.py tests/test_runner.py tests/test_replay_properties.py \
  tests/test_model.py tests/test_records.py tests/test_expr.py tests/test_playbook.py \
  tests/test_detect.py tests/test_adaptive.py tests/test_live.py tests/test_dataset_retail.py \
  tests/test_ingest.py tests/test_fuzz_parsers.py
STREAM := $(WHEELS)/stream.jsonl
test-compiled: $(STAMP)
	@if ! command -v cc >/dev/null 2>&1 || ! python3 -c 'import sys, sysconfig, os; \
	    sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then \
	  echo "no C compiler or no Python headers here: the compiled build is not tested"; \
	else $(MAKE) --no-print-directory compiled-checks; fi

compiled-checks: $(CSTAMP)
	$(CPY) -c 'import forewarn.engine as e, sys; sys.exit(0 if e.__file__.endswith(".so") else "not compiled: " + e.__file__)'
	$(CPY) -m pytest -q -p no:cacheprovider $(CORE_TESTS)
	$(PY) bench/engine.py --subjects 10000 --events 100000 --write-stream $(STREAM) >/dev/null
	$(VENV)/bin/forewarn replay --playbooks examples/playbooks --events $(STREAM) \
	  --until 2027-01-01T00:00:00Z > $(WHEELS)/replay-pure.jsonl
	$(CVENV)/bin/forewarn replay --playbooks examples/playbooks --events $(STREAM) \
	  --until 2027-01-01T00:00:00Z > $(WHEELS)/replay-compiled.jsonl
	cmp $(WHEELS)/replay-pure.jsonl $(WHEELS)/replay-compiled.jsonl
	@echo "compiled build: $$(wc -l < $(WHEELS)/replay-compiled.jsonl) firings, the same as pure Python"

clean:
	rm -rf $(VENV) $(CVENV) build .pytest_cache .mypy_cache .ruff_cache
