"""Source databases and dumps of the sample datasets, made once per server."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg import sql

from tests.conftest import drop_database
from tests.harness.datasets import load_chinook, load_pagila
from tests.harness.dumps import FORMATS, make_dump
from tests.harness.pg import PgServer

# pagila_schema.sql uses virtual generated columns, which only PostgreSQL 18 has
PAGILA_MIN_MAJOR = 18


@pytest.fixture(scope="session")
def dumps(pg: PgServer, tmp_path_factory: pytest.TempPathFactory):
    """{dataset: {format: path}} for chinook (every major) and pagila (18+), dumped by pg_dump 18."""
    out = tmp_path_factory.mktemp(f"dumps-pg{pg.major}")
    made: dict[str, dict[str, Path]] = {}
    sources = [("chinook", load_chinook)] + ([("pagila", load_pagila)] if pg.major >= PAGILA_MIN_MAJOR else [])
    for name, loader in sources:
        loader(pg, f"{name}_source")
        made[name] = {fmt: make_dump(pg, f"{name}_source", fmt, out / f"{name}.{fmt}") for fmt in FORMATS}
    return made


def fingerprint_db(pg: PgServer, db: str) -> dict:
    """Row count of every user table and the count of each kind of object: equal means same content."""
    tables = pg.sql(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgops_dbrestore') ORDER BY 1",
        dbname=db,
    )
    rows = {t: pg.sql(f"SELECT count(*) FROM {t}", dbname=db)[0][0] for (t,) in tables}  # names from quote_ident
    objects = pg.sql(
        "SELECT 'relkind ' || c.relkind::text, count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'pgops_dbrestore') GROUP BY 1 "
        "UNION ALL SELECT 'functions', count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'public' "
        "UNION ALL SELECT 'triggers', count(*) FROM pg_trigger WHERE NOT tgisinternal "
        "UNION ALL SELECT 'types', count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname = 'public' "
        "UNION ALL SELECT 'constraints', count(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
        "WHERE n.nspname = 'public'",
        dbname=db,
    )
    return {"rows": rows, "objects": dict(objects)}


@pytest.fixture
def live_db(pg: PgServer, dumps):
    """A live hoge_db-like database (hostile name) holding chinook with one table emptied, to tell it apart."""
    name = 'hoge "live"; ü'
    pg.sql(sql.SQL("CREATE DATABASE {} TEMPLATE chinook_source").format(sql.Identifier(name)))
    pg.sql("DELETE FROM invoice_line", dbname=name)
    yield name
    names = [r[0] for r in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (name + "%",))]
    for n in names:
        drop_database(pg, n)


def records_kept_by(pg: PgServer, role: str) -> None:
    """Let a login role that is not a superuser keep the collection's records itself: a superuser's records
    (made by earlier tests on this server) are not its to use, and it needs CREATE to make its own."""
    pg.sql("DROP SCHEMA IF EXISTS pgops_dbrestore CASCADE")
    pg.sql(sql.SQL("GRANT CREATE ON DATABASE postgres TO {}").format(sql.Identifier(role)))
