# Two commands for a newcomer: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/.cache/collections
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: venv collections demo test lint pytest build-smoke clean

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# Make this checkout importable as ansible_collections.pgops.dbrestore.
collections: venv
	mkdir -p .cache/collections/ansible_collections/pgops
	ln -sfn $(CURDIR) .cache/collections/ansible_collections/pgops/dbrestore

demo: collections
	$(PY) demo/demo.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

pytest: collections
	$(BIN)/pytest -q tests

test: lint pytest

clean:
	rm -rf .cache .pytest_cache .ruff_cache pgops-dbrestore-*.tar.gz
