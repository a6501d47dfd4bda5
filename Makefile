# The same commands run locally and in CI.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test check bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

EXAMPLE := --playbooks examples/playbooks --events examples/events --until 2026-12-31T00:00:00Z

run: $(STAMP)
	$(VENV)/bin/forewarn check examples/playbooks | tail -n 1
	$(VENV)/bin/forewarn replay $(EXAMPLE) --format table
	$(VENV)/bin/forewarn replay $(EXAMPLE)

test: $(STAMP)
	$(PY) -m pytest -q

check: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -q tests/test_layers.py

bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
