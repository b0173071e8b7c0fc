"""A large table loaded by several COPY sessions from the one dump stream holds exactly what a plain pg_restore
(psql for a plain dump) of the same dump loads: row counts and a checksum of every table, for every dump format."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from tests.conftest import drop_database
from tests.harness.dumps import make_dump
from tests.harness.pg import PgServer, client_bindir
from tests.integration.test_restore import restore

pytestmark = pytest.mark.newest_major

# rows with what COPY text escapes (tab, newline, carriage return, backslash, a lone "\." line), NULLs,
# multibyte text and arrays; a table referencing the large one, so its constraint is made after the split load
SOURCE_SQL = r"""
CREATE SCHEMA "odd schema";
CREATE TABLE "odd schema"."Events" (id bigint PRIMARY KEY, "pay load" text, note text, amount numeric, tags text[]);
INSERT INTO "odd schema"."Events"
SELECT g, repeat(md5(g::text), 8) || CASE g % 7 WHEN 0 THEN E'\ttab' WHEN 1 THEN E'new\nline' WHEN 2 THEN E'back\\slash'
                                             WHEN 3 THEN E'\n\\.\n' WHEN 4 THEN E'cr\r' ELSE 'ü€𝄞' END,
       CASE WHEN g % 5 = 0 THEN NULL ELSE 'n' || g END, g * 1.25, ARRAY['a' || g, NULL, E'x\ty']
FROM generate_series(1, 60000) g;
CREATE INDEX ON "odd schema"."Events" (note);
CREATE TABLE public.refs (id serial PRIMARY KEY, event_id bigint NOT NULL REFERENCES "odd schema"."Events"(id));
INSERT INTO public.refs (event_id) SELECT g * 3 FROM generate_series(1, 5000) g;
CREATE TABLE public.small (k text PRIMARY KEY);
INSERT INTO public.small VALUES ('a'), ('b');
"""


def tables(pg: PgServer, db: str) -> dict[str, tuple[int, str]]:
    """Every user table: its row count and the md5 of its rows in order."""
    names = pg.sql("SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables ORDER BY 1", dbname=db)
    query = "SELECT count(*), md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) FROM {} x"
    return {t: tuple(pg.sql(query.format(t), dbname=db)[0]) for (t,) in names}  # names from format('%I')


@pytest.fixture
def source(pg: PgServer):
    pg.sql("CREATE DATABASE split_source")
    pg.sql(SOURCE_SQL, dbname="split_source")
    yield "split_source"
    drop_database(pg, "split_source")


def load_by_hand(pg: PgServer, db: str, dump: Path, fmt: str) -> None:
    """pg_restore, or psql for a plain dump, as a person would run them."""
    if fmt.startswith("plain"):
        sql_text = gzip.decompress(dump.read_bytes()) if fmt == "plain.gz" else dump.read_bytes()
        psql = [str(client_bindir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db]
        subprocess.run(psql, input=sql_text, env=pg.client_env(), check=True, capture_output=True)
    else:
        subprocess.run([str(client_bindir() / "pg_restore"), "--exit-on-error", "-d", db, str(dump)],
                       env=pg.client_env(), check=True)  # fmt: skip


@pytest.mark.parametrize("fmt", ["custom", "directory", "tar", "plain", "plain.gz"])
def test_split_load_equals_a_plain_pg_restore(pg: PgServer, source: str, dbname: str, tmp_path: Path, fmt: str):
    dump = make_dump(pg, source, fmt, tmp_path / f"split.{fmt}")
    plain = f"split_plain_{fmt.replace('.', '_')}"
    pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(plain)))
    try:
        load_by_hand(pg, plain, dump, fmt)
        pg.sql(sql.SQL("DROP DATABASE {}").format(sql.Identifier(dbname)))
        pg.sql(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(dbname), sql.Identifier(source)))
        request = RestoreRequest(db=dbname, src=str(dump), bindir=str(client_bindir()), jobs=2, parallel_table_mb=1)
        checked = restore_database(pg.params(), request, check_mode=True)  # the plan says it, as the run does it
        assert "(odd schema.Events: 2 COPY sessions each when in the dump)" in checked.plan[0], checked.plan
        res = restore(pg, dbname, dump, jobs=2, parallel_table_mb=1, keep_previous=0, force=True)
        assert res.changed
        assert "loaded odd schema.Events by 2 COPY sessions each" in " ".join(res.log), res.log
        read_here = fmt in ("custom", "directory")  # tar and plain dumps' rows come through pg_restore or psql
        assert (", read from the archive here, the rest by" in " ".join(res.log)) == read_here, res.log
        expected = tables(pg, plain)
        assert len(expected) == 3 and expected['"odd schema"."Events"'][0] == 60000
        assert tables(pg, dbname) == expected
        constraints = (
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE contype IN ('p','f') ORDER BY 1"
        )
        assert pg.sql(constraints, dbname=dbname) == pg.sql(constraints, dbname=plain)
        indexes = "SELECT indexdef FROM pg_indexes WHERE schemaname <> 'pg_catalog' ORDER BY 1"
        assert pg.sql(indexes, dbname=dbname) == pg.sql(indexes, dbname=plain)
    finally:
        drop_database(pg, plain)


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_split_rows_keep_the_dumps_encoding(pg: PgServer, dbname: str, tmp_path: Path, fmt: str):
    """A LATIN1 database's dump (a column name too) loaded split into a UTF8 one: names are read and rows written
    in the dump's encoding."""
    source = f"split_latin1_{fmt}"
    pg.sql(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'").format(
        sql.Identifier(source)))  # fmt: skip
    try:
        pg.sql('CREATE TABLE public.names (id int, "straße" text); '
               "INSERT INTO public.names SELECT g, 'Müller ' || g || repeat('é', 40) FROM generate_series(1, 20000) g",
               dbname=source)  # fmt: skip
        dump = make_dump(pg, source, fmt, tmp_path / f"latin1.{fmt}")
        load_by_hand(pg, dbname, dump, fmt)  # the live database: UTF8, the same tables
        res = restore(pg, dbname, dump, jobs=2, parallel_table_mb=1, keep_previous=0, force=True)
        assert "loaded public.names by 2 COPY sessions each" in " ".join(res.log), res.log
        assert pg.sql("SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = %s", (dbname,)) == [
            ("UTF8",)]  # fmt: skip
        assert pg.sql('SELECT "straße" FROM public.names WHERE id = 7', dbname=dbname) == [("Müller 7" + "é" * 40,)]
        same = 'SELECT count(*), sum(length("straße")), min("straße"), max("straße") FROM public.names'  # not md5
        assert pg.sql(same, dbname=dbname) == pg.sql(same, dbname=source)
    finally:
        drop_database(pg, source)


@pytest.mark.parametrize(("fmt", "error"), [
    ("plain", r"odd schema\.Events ended without its end marker"),
    ("custom", r"the dump's data of table odd schema\.Events cannot be read: .* runs past the end of the file"),
])  # fmt: skip
def test_a_dump_cut_in_a_split_tables_rows_fails_and_the_live_database_stays(
    pg: PgServer, source: str, dbname: str, tmp_path: Path, fmt: str, error: str
):
    dump = make_dump(pg, source, fmt, tmp_path / f"split.{fmt}")
    text = dump.read_bytes()
    cut = text.index(b'COPY "odd schema"."Events"') if fmt == "plain" else 0
    dump.write_bytes(text[: cut + len(text[cut:]) // 2])
    load_by_hand(pg, dbname, make_dump(pg, source, "custom", tmp_path / "whole.pgc"), "custom")
    before = tables(pg, dbname)
    with pytest.raises(PgOpsError, match=error):
        restore(pg, dbname, dump, jobs=2, parallel_table_mb=1, force=True)
    assert tables(pg, dbname) == before
    assert pg.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (dbname,)) == [(True,)]
    assert pg.sql("SELECT count(*) FROM pg_database WHERE datname LIKE %s", (dbname[:8] + "%",)) == [(1,)]
