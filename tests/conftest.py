"""Fixtures: a real PostgreSQL server per major (PGOPS_TEST_MAJORS, default all of 10-18)."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
# this checkout, importable as ansible_collections.pgops.dbrestore (made by `make collections`)
sys.path.insert(0, str(ROOT / ".cache" / "collections"))

from tests.harness.pg import ALL_MAJORS, PgServer, start_server  # noqa: E402

# the restore suite is long: it runs on these majors (10 oldest, 18 newest, every other LTS-ish step)
RESTORE_MAJORS = (10, 13, 15, 17, 18)


def selected_majors() -> list[int]:
    raw = os.environ.get("PGOPS_TEST_MAJORS", "")
    return [int(m) for m in raw.replace(",", " ").split()] if raw.strip() else list(ALL_MAJORS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pg" in metafunc.fixturenames:
        majors = selected_majors()
        if metafunc.definition.get_closest_marker("edge_majors"):
            majors = sorted({min(majors), max(majors)})
        if metafunc.definition.get_closest_marker("newest_major"):
            majors = [max(majors)]
        if metafunc.definition.get_closest_marker("restore_majors"):
            chosen = [m for m in majors if m in RESTORE_MAJORS]
            if not chosen:  # never silently run on a major nobody selected, nor skip the suite quietly
                raise pytest.UsageError(
                    f"PGOPS_TEST_MAJORS={' '.join(map(str, majors))} selects none of the majors the restore suite "
                    f"runs on ({' '.join(map(str, RESTORE_MAJORS))}; RESTORE_MAJORS in tests/conftest.py), so "
                    f"{metafunc.definition.nodeid} would have nothing to run on: add one of them to "
                    "PGOPS_TEST_MAJORS, or deselect the restore tests"
                )
            majors = chosen
        metafunc.parametrize("pg", majors, indirect=True, scope="session", ids=lambda m: f"pg{m}")


@pytest.fixture(scope="session")
def pg(request: pytest.FixtureRequest):
    server: PgServer = start_server(request.param)
    yield server
    server.destroy()


@pytest.fixture
def dbname(pg: PgServer):
    """A fresh database with a hostile name (quotes, space, semicolon, unicode), dropped afterwards."""
    name = f'hoge "db"; -- ü {uuid.uuid4().hex[:6]}'
    pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield name
    drop_database(pg, name)


def drop_database(pg: PgServer, name: str) -> None:
    """Drop a test database whatever state a test left it in."""
    pg.sql("UPDATE pg_database SET datallowconn = true WHERE datname = %s", (name,))
    pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    pg.sql(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n 2 --dist loadgroup`), keep each major's tests on one worker, so that
    every server and its sample dumps are made once. The newest-major-only tests (mostly
    ansible-playbook runs) are a group of their own, so that the two workers share the work evenly."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "pg" in callspec.params:
            newest = "-newest" if item.get_closest_marker("newest_major") else ""
            item.add_marker(pytest.mark.xdist_group(f"pg{callspec.params['pg']}{newest}"))
