"""keep_tables: table names, the dump's CREATE TABLE read back, and the comparison with the live columns."""

from __future__ import annotations

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.keep import (
    KeepTable,
    differences,
    dump_columns,
    parse_tables,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError

SCHEMA = """
CREATE TABLE public.users (
    id bigint NOT NULL
);

CREATE TABLE "App"."Sessions" (
    id bigint NOT NULL,
    session_id character varying NOT NULL,
    data text COLLATE pg_catalog."C",
    "updatedAt" timestamp(6) without time zone
);
"""
LIVE = [("id", "id", "bigint"), ("session_id", "session_id", "character varying"), ("data", "data", "text"),
        ("updatedAt", '"updatedAt"', "timestamp(6) without time zone")]  # fmt: skip


def test_names():
    assert parse_tables(["sessions", "App.Sessions"]) == [KeepTable("public", "sessions"), KeepTable("App", "Sessions")]
    for bad in (["a.b.c"], [".x"], ["x."], ["sessions", "public.sessions"]):
        with pytest.raises(PgOpsError):
            parse_tables(bad)


def test_the_dumps_columns_against_the_live_ones():
    found = dump_columns(SCHEMA, KeepTable("App", "Sessions"))
    assert found == ["id bigint NOT NULL", "session_id character varying NOT NULL", 'data text COLLATE pg_catalog."C"',
                     '"updatedAt" timestamp(6) without time zone']  # fmt: skip
    assert differences(LIVE, found) == []
    assert dump_columns(SCHEMA, KeepTable("public", "sessions")) is None
    assert differences(LIVE[:3], found) == ['the dump has a column more ("updatedAt" timestamp(6) without time zone)']
    assert differences(LIVE, found[:3]) == ['the dump lacks column "updatedAt" (timestamp(6) without time zone)']
    other = [LIVE[0], ("session_id", "session_id", "text"), *LIVE[2:]]
    wrong = "column 2: live 'session_id text', dump 'session_id character varying NOT NULL'"
    assert differences(other, found) == [wrong]
