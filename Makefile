# Two commands for a newcomer: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/.cache/collections
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

# PostgreSQL majors the real-server tests run on (PGOPS_TEST_MAJORS="18" for a quick run)
PGOPS_TEST_MAJORS ?= 10 11 12 13 14 15 16 17 18
export PGOPS_TEST_MAJORS

.PHONY: venv collections peer-collections demo test lint pytest sanity molecule bench bench-quick bench-deps changelog clean

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

# containers.podman and community.postgresql, extracted from the ansible package on PyPI
# (molecule's driver, the scenarios' helpers and the bench's peer)
peer-collections: collections
	bash extensions/molecule/fetch-collections.sh

demo: collections
	$(PY) demo/demo.py

lint: peer-collections
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/ansible-lint
	$(BIN)/antsibull-changelog lint

# two workers, each major's tests on one of them (tests/conftest.py groups them)
pytest: collections
	$(BIN)/pytest -q -n 2 --dist loadgroup tests

# ansible-test sanity and units on a copy at ansible_collections/pgops/dbrestore
sanity: venv
	bash tests/sanity/run.sh

# molecule scenarios in podman systemd containers (root)
molecule: collections
	bash extensions/molecule/run.sh

test: lint pytest sanity bench-quick molecule

# bench/run.py's plot package and community.postgresql, the peer it is measured against
$(VENV)/.bench-installed: $(VENV)/.installed bench/requirements.txt
	$(PY) -m pip install -q -r bench/requirements.txt
	touch $@

bench-deps: peer-collections $(VENV)/.bench-installed

# ~22 min on 2 cores; BENCH_ARGS="--pg 15" for another major. Output in bench/out/
bench: bench-deps
	$(PY) bench/run.py $(BENCH_ARGS)

# every bench still runs (< 3 min); part of make test
bench-quick: bench-deps
	$(PY) bench/run.py --quick

# Regenerate CHANGELOG.md from changelogs/fragments for the version in galaxy.yml.
changelog: collections
	rm -f changelogs/changelog.yaml changelogs/.plugin-cache.yaml
	$(BIN)/antsibull-changelog release --version $$(sed -n 's/^version: //p' galaxy.yml)

clean:
	rm -rf .cache .pytest_cache .ruff_cache pgops-dbrestore-*.tar.gz
