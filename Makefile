# Two commands for a fresh machine: `make quickstart` and `make test` (both idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-fast

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(PY) engine/train.py --config configs/quickstart.yaml

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not slow"
