"""Load the sample databases of tests/data (chinook, pagila) into a server under any name."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from psycopg import sql

from tests.harness.pg import PgServer

ROOT = Path(__file__).resolve().parents[2]
DATASETS = ROOT / "tests" / "data"
CHINOOK = DATASETS / "chinook_postgresql.sql"
PAGILA = DATASETS / "pagila_schema.sql"

# chinook creates and enters its own database; these lines are dropped to load it elsewhere
_CHINOOK_OWN_DB = re.compile(r"^(DROP DATABASE|CREATE DATABASE|\\c )", re.IGNORECASE)


def chinook_without_own_database() -> str:
    return "".join(ln for ln in CHINOOK.read_text().splitlines(keepends=True) if not _CHINOOK_OWN_DB.match(ln))


def create_database(pg: PgServer, name: str) -> None:
    pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def load_chinook(pg: PgServer, name: str) -> None:
    create_database(pg, name)
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
        f.write(chinook_without_own_database())
        f.flush()
        pg.psql_file(name, Path(f.name))


def load_pagila(pg: PgServer, name: str) -> None:
    create_database(pg, name)
    pg.psql_file(name, PAGILA)
