"""pg_restore_db logic against real servers: formats, failures, idempotency, rollback, locking, crashes.

The crash tests stop the restore at a named step (operation.PAUSE_ENV) and kill it there; run them
many times in a row with PGOPS_CRASH_REPEAT=<n>, e.g.
  PGOPS_TEST_MAJORS="10 18" PGOPS_CRASH_REPEAT=20 pytest -q tests/integration/test_restore.py -k killed
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils import pruner
from ansible_collections.pgops.dbrestore.plugins.module_utils.copies import name_base, staging_name
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import LOCK_NOT_AVAILABLE, PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.registry import LOCK_CLASS, PRUNE_CLASS, Registry
from ansible_collections.pgops.dbrestore.plugins.module_utils.restart import RestartSpec
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from tests.conftest import drop_database
from tests.harness.datasets import CHINOOK
from tests.harness.dumps import FORMATS, make_dump
from tests.harness.pg import PgServer, client_bindir
from tests.harness.restore_process import paused_restore, restore_process
from tests.integration.conftest import PAGILA_MIN_MAJOR, fingerprint_db, records_kept_by
from tests.integration.test_terminate import storm_for

pytestmark = pytest.mark.restore_majors
CRASH_REPEAT = int(os.environ.get("PGOPS_CRASH_REPEAT", "1"))


def restore(pg: PgServer, db: str, src: Path | str | None = None, **kw):
    return restore_database(pg.params(), RestoreRequest(db=db, src=str(src) if src else None,
                                                        bindir=str(client_bindir()), **kw))  # fmt: skip


def allows_connections(pg: PgServer, db: str) -> bool:
    return pg.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (db,)) == [(True,)]


def invoice_lines(pg: PgServer, db: str) -> int:
    return pg.sql("SELECT count(*) FROM invoice_line", dbname=db)[0][0]


def genre(pg: PgServer, db: str, genre_id: int) -> list:
    return pg.sql("SELECT name FROM genre WHERE genre_id = %s", (genre_id,), dbname=db)


def previous_copies(pg: PgServer, db: str) -> list[str]:
    """The previous copies of db recorded by the collection, newest first."""
    pg.pruned()
    with pg.connect() as conn:
        return [c.name for c in Registry(conn).copies(db, "previous")]


def ours(pg: PgServer, db: str) -> set[str]:
    """Every database named after db: the live one, its staging, previous and undone copies."""
    base = name_base(db)
    return {n for n in pg.databases() if n == db or n.startswith(base + "_")}


def no_stamps(steps: list[str]) -> list[str]:
    return [re.sub(r"_(prev|undone)_\d{8}T\d{9}Z", r"_\1_<stamp>", s) for s in steps]


# --- formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_restores_chinook_exactly(pg: PgServer, dumps, live_db: str, fmt: str):
    expected = fingerprint_db(pg, "chinook_source")
    res = restore(pg, live_db, dumps["chinook"][fmt])
    assert res.changed and res.format == fmt and res.previous_db in pg.databases()
    assert fingerprint_db(pg, live_db) == expected
    assert res.marker_before is None
    assert (
        res.marker_after["sha256"] == res.sha256 and res.marker_after["format"] == fmt and "writes" in res.marker_after
    )
    assert staging_name(live_db) not in pg.databases() and allows_connections(pg, live_db)
    assert set(res.phases_ms) == {"lock", "inspect", "preflight", "stage", "verify", "switch", "total"}
    assert res.steps_done == res.plan and len(res.plan) == 3  # stage, verify, switch: nothing to prune yet
    assert res.created == [staging_name(live_db)] and res.dropped == []
    assert res.renamed == [f"{live_db} -> {res.previous_db}", f"{staging_name(live_db)} -> {live_db}"]
    assert previous_copies(pg, live_db) == [res.previous_db]
    assert res.rollback == {"db": live_db, "rollback": True} and len(res.rollback_sql) == 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_restores_pagila_exactly(pg: PgServer, dumps, fmt: str):
    if pg.major < PAGILA_MIN_MAJOR:
        pytest.skip("the pagila sample uses virtual generated columns (PostgreSQL 18+)")
    db = "pagila restored"
    try:
        res = restore(pg, db, dumps["pagila"][fmt])
        assert res.changed and not res.previous_db and res.rollback == {}  # a new database: nothing to swap
        assert res.renamed == [f"{staging_name(db)} -> {db}"]
        assert fingerprint_db(pg, db) == fingerprint_db(pg, "pagila_source")
    finally:
        drop_database(pg, db)


def test_chinook_original_sql_with_its_own_create_database(pg: PgServer, live_db: str):
    """The original chinook file drops, creates and enters its own database: those lines are left out."""
    res = restore(pg, live_db, CHINOOK)
    assert res.format == "plain"
    assert res.stripped_statements == ["DROP DATABASE IF EXISTS chinook;", "CREATE DATABASE chinook;", "\\c chinook;"]
    assert fingerprint_db(pg, live_db) == fingerprint_db(pg, "chinook_source")
    assert "chinook" not in pg.databases()


def test_plain_dump_with_backslash_lines_in_quoted_text_loads(pg: PgServer, live_db: str, tmp_path: Path):
    """pg_dump writes function bodies and string literals verbatim: a line of them may start with a backslash,
    which psql does not read as a meta-command there."""
    src_db = "backslash_source"
    pg.sql(f"CREATE DATABASE {src_db}")
    try:
        pg.sql(
            # (?x): blanks, the newline included, do not count in the pattern
            "CREATE FUNCTION public.digits(t text) RETURNS text LANGUAGE sql AS $f$SELECT substring(t from '(?x)\n"
            "\\d+')$f$",
            dbname=src_db,
        )
        pg.sql("CREATE VIEW public.sample AS SELECT public.digits('abc 42') AS d", dbname=src_db)
        dump = make_dump(pg, src_db, "plain", tmp_path / "backslash.sql")
        assert "\n\\d+')" in dump.read_text()
        res = restore(pg, live_db, dump, force=True)
        assert res.changed and pg.sql("SELECT d FROM public.sample", dbname=live_db) == [("42",)]
    finally:
        drop_database(pg, src_db)


def test_plain_dump_meta_command_never_runs(pg: PgServer, dumps, live_db: str, tmp_path: Path):
    """A psql meta-command planted in a plain dump (\\! runs a shell command) is refused, not run."""
    pwned = tmp_path / "pwned"
    lines = dumps["chinook"]["plain"].read_text().splitlines(keepends=True)
    at = next(i for i, ln in enumerate(lines) if ln.startswith("CREATE TABLE"))
    planted = tmp_path / "planted.sql"
    planted.write_text("".join([*lines[:at], f"\\! touch {pwned}\n", *lines[at:]]))
    before, dbs = fingerprint_db(pg, live_db), pg.databases()
    with pytest.raises(PgOpsError, match=r"psql exited with 3: .*backslash commands are restricted") as err:
        restore(pg, live_db, planted)
    assert f"psql:<stdin>:{at + 1}: error" in str(err.value), "the error does not name the dump's line"
    assert not pwned.exists(), "the dump ran a shell command"
    assert err.value.details["changed"] is False
    assert fingerprint_db(pg, live_db) == before and pg.databases() == dbs


# --- failures: the live database is never lost, and the error tells what was done -----------------


def _broken_dumps(dumps, tmp: Path) -> dict[str, tuple[Path, str]]:
    custom = dumps["chinook"]["custom"].read_bytes()
    plain = dumps["chinook"]["plain"].read_text()
    cases = {
        "truncated": (custom[: len(custom) * 2 // 3], "pg_restore exited with 1"),
        "corrupt": (custom[:4000] + bytes(b ^ 0x5A for b in custom[4000:9000]) + custom[9000:], "pg_restore exited"),
        "wrong kind": (b"\x89PNG\r\n\x1a\n" + os.urandom(3000), "is not a PostgreSQL dump"),
        "empty": (b"", "is empty"),
        "bad sql": ((plain + "\nSELECT no_such_function();\n").encode(), "psql exited with 3"),
        "truncated gzip": (dumps["chinook"]["plain.gz"].read_bytes()[:5000], "Compressed file ended"),
    }
    out = {}
    for name, (data, expect) in cases.items():
        path = tmp / f"{name}.dump"
        path.write_bytes(data)
        out[name] = (path, expect)
    out["missing"] = (tmp / "missing.dump", "does not exist")
    return out


@pytest.mark.parametrize(
    "case", ["truncated", "corrupt", "wrong kind", "empty", "bad sql", "truncated gzip", "missing"]
)
@pytest.mark.parametrize("strategy", ["swap", "replace"])
def test_bad_dump_loses_nothing(pg: PgServer, dumps, live_db: str, tmp_path: Path, case: str, strategy: str):
    path, expect = _broken_dumps(dumps, tmp_path)[case]
    before = fingerprint_db(pg, live_db)
    dbs = pg.databases()
    if strategy == "replace" and case == "bad sql":
        # the dump reads fine and fails only while it loads: replace had dropped the live database by then
        with pytest.raises(PgOpsError, match=rf'"{re.escape(live_db)}" was dropped before the restore') as err:
            restore(pg, live_db, path, strategy=strategy)
        assert expect in str(err.value)
        got = err.value.details
        assert got["changed"] is True and got["dropped"] == [live_db]
        assert got["steps_done"] == [f'close and clear "{live_db}" (allow_connections) and drop it']
        assert any("strategy=replace" in line for line in got["log"])
        assert pg.databases() == dbs - {live_db}, "a staging copy was left behind"
        return
    with pytest.raises(PgOpsError, match=re.escape(expect)) as err:
        restore(pg, live_db, path, strategy=strategy)
    got = err.value.details
    assert got["changed"] is False and got["dropped"] == [] and got["renamed"] == [] and got["created"] == []
    if strategy == "swap" and case in ("truncated", "bad sql"):  # read fine up front, failed while loading
        assert got["steps_done"] == [] and "stage" in got["phases_ms"]
        assert any(staging_name(live_db) in line for line in got["log"]), "the log does not say what was done"
    assert fingerprint_db(pg, live_db) == before, "the live database changed"
    assert pg.databases() == dbs, "a staging or previous copy was left behind"
    assert allows_connections(pg, live_db)


def test_swap_failing_in_verify_switches_nothing(pg: PgServer, dumps, live_db: str):
    before = fingerprint_db(pg, live_db)
    with pytest.raises(PgOpsError, match=r"verify_query returned False on the restored copy, not true") as err:
        restore(pg, live_db, dumps["chinook"]["custom"], verify_query="SELECT count(*) > 1000000 FROM track")
    got = err.value.details
    assert got["changed"] is False and got["created"] == [] and got["renamed"] == []
    assert got["steps_done"] == [f'create "{staging_name(live_db)}" and restore the custom dump into it']
    assert got["log"] and "stage" in got["phases_ms"] and "verify" in got["phases_ms"]
    assert fingerprint_db(pg, live_db) == before and staging_name(live_db) not in pg.databases()
    assert allows_connections(pg, live_db)
    res = restore(pg, live_db, dumps["chinook"]["custom"], verify_query="SELECT count(*) > 0 FROM track")
    assert res.changed and invoice_lines(pg, live_db) == 2240


def test_replace_failing_in_verify_reports_the_dropped_database(pg: PgServer, dumps, live_db: str):
    with pytest.raises(PgOpsError, match=r"was dropped before the restore .* verify_query returned False") as err:
        restore(pg, live_db, dumps["chinook"]["custom"], strategy="replace", verify_query="SELECT false")
    got = err.value.details
    assert got["changed"] is True and got["dropped"] == [live_db] and len(got["steps_done"]) == 2
    assert got["log"] and live_db not in pg.databases() and staging_name(live_db) not in pg.databases()


@pytest.mark.parametrize("kind", ["swap", "rollback"])
def test_switch_failing_at_wait_timeout_is_reported_honestly(pg: PgServer, dumps, live_db: str, kind: str):
    """revoke_connect cannot keep superusers out: a superuser storm outlasts wait_timeout during the switch.

    Nothing is renamed, the live database stays open with its ACL, and the result says which sessions ended.
    """
    if kind == "rollback":
        restore(pg, live_db, dumps["chinook"]["custom"])
        pg.sql("INSERT INTO genre (genre_id, name) VALUES (9001, 'after the restore')", dbname=live_db)
    pg.sql(sql.SQL("GRANT CONNECT ON DATABASE {} TO pg_monitor").format(sql.Identifier(live_db)))
    acls = "SELECT datname, datacl::text FROM pg_database ORDER BY 1"
    before, acl, dbs = fingerprint_db(pg, live_db), pg.sql(acls), pg.databases()
    with storm_for(pg, live_db, clients=10) as storm:
        storm.wait_connected()
        with pytest.raises(PgOpsError, match=r"still on .* after wait_timeout=1s") as err:
            if kind == "swap":
                restore(pg, live_db, dumps["chinook"]["tar"], block_new_connections="revoke_connect", wait_timeout=1)
            else:
                restore(pg, live_db, rollback=True, block_new_connections="revoke_connect", wait_timeout=1)
    got = err.value.details
    assert got["renamed"] == [] and got["steps_done"] == (
        [] if kind == "rollback" else [s for s in got["plan"] if not s.startswith("close and clear")]
    )
    assert got["terminated"], "sessions were ended before the timeout: the result must list them"
    assert got["changed"] is True, "sessions were ended: something is different now"
    assert got["log"]
    assert fingerprint_db(pg, live_db) == before and pg.databases() == dbs
    assert allows_connections(pg, live_db) and pg.sql(acls) == acl


# --- idempotency -----------------------------------------------------------------------------------


@pytest.fixture
def other_dump(pg: PgServer, dumps, tmp_path: Path) -> Path:
    """chinook with one more genre: another dump, of other content."""
    db = "chinook_other"
    pg.sql(f"CREATE DATABASE {db} TEMPLATE chinook_source")
    try:
        pg.sql("INSERT INTO genre (genre_id, name) VALUES (7777, 'only in the other dump')", dbname=db)
        return make_dump(pg, db, "custom", tmp_path / "other.dump")
    finally:
        drop_database(pg, db)


def test_same_dump_is_a_no_op_unless_forced(pg: PgServer, dumps, live_db: str):
    src = dumps["chinook"]["custom"]
    first = restore(pg, live_db, src)
    assert first.changed and invoice_lines(pg, live_db) == 2240
    dbs = pg.databases()
    t = time.monotonic()
    second = restore(pg, live_db, src)
    assert not second.changed and time.monotonic() - t < 5
    assert second.plan == [] and second.steps_done == [] and second.created == [] and second.renamed == []
    assert second.marker_before is not None and second.marker_before == second.marker_after == first.marker_after
    assert any("already holds this dump" in line for line in second.log) and pg.databases() == dbs

    pg.sql("INSERT INTO genre (genre_id, name) VALUES (9002, 'written after the first restore')", dbname=live_db)
    forced = restore(pg, live_db, src, force=True)
    assert forced.changed and forced.previous_db and forced.marker_after["sha256"] == first.sha256
    assert genre(pg, live_db, 9002) == [], "force restored nothing"
    assert previous_copies(pg, live_db) == [forced.previous_db]  # keep_previous=1 dropped the first one
    assert first.previous_db in forced.dropping


def test_a_different_dump_over_a_restored_database_restores(pg: PgServer, dumps, live_db: str, other_dump: Path):
    first = restore(pg, live_db, dumps["chinook"]["custom"])
    assert first.marker_after is not None
    second = restore(pg, live_db, other_dump)
    assert second.changed and second.marker_before["sha256"] == first.sha256 != second.sha256
    assert second.marker_after["sha256"] == second.sha256 and second.steps_done == second.plan
    assert genre(pg, live_db, 7777) == [("only in the other dump",)]
    # the same content in another format is another dump too: restored, not skipped
    third = restore(pg, live_db, dumps["chinook"]["plain"])
    assert third.changed and genre(pg, live_db, 7777) == []


# --- rollback ------------------------------------------------------------------------------------


def test_rollback_brings_back_the_copy_from_before_the_forced_restore(pg: PgServer, dumps, live_db: str):
    src = dumps["chinook"]["custom"]
    restore(pg, live_db, src)
    pg.sql("INSERT INTO genre (genre_id, name) VALUES (9003, 'written after the first restore')", dbname=live_db)
    forced = restore(pg, live_db, src, force=True)
    assert genre(pg, live_db, 9003) == []

    back = restore(pg, live_db, rollback=True)
    assert back.changed and back.previous_db == forced.previous_db
    assert genre(pg, live_db, 9003) == [("written after the first restore",)], "the rollback changed nothing"
    assert allows_connections(pg, live_db) and previous_copies(pg, live_db) == []
    with pytest.raises(PgOpsError, match=r"no previous copy of .* recorded by pgops\.dbrestore to roll back to") as e:
        restore(pg, live_db, rollback=True)
    assert e.value.details["changed"] is False and e.value.details["steps_done"] == []


def test_rollback_brings_the_old_rows_back(pg: PgServer, dumps, live_db: str):
    pg.sql("INSERT INTO genre (genre_id, name) VALUES (9999, 'only in the live db')", dbname=live_db)
    res = restore(pg, live_db, dumps["chinook"]["plain.gz"])
    assert invoice_lines(pg, live_db) == 2240 and genre(pg, live_db, 9999) == []
    back = restore(pg, live_db, rollback=True)
    assert invoice_lines(pg, live_db) == 0
    assert genre(pg, live_db, 9999) == [("only in the live db",)]
    assert allows_connections(pg, live_db)
    undone = [d for d in pg.databases() if "_undone_" in d]
    assert len(undone) == 1 and res.previous_db == back.previous_db
    assert back.renamed == [f"{live_db} -> {undone[0]}", f"{res.previous_db} -> {live_db}"]
    assert not allows_connections(pg, undone[0])  # the restored copy is kept, closed, not lost


def test_only_recorded_copies_are_previous_copies(pg: PgServer, dumps, live_db: str):
    """A database merely named like a previous copy is neither rolled in nor pruned."""
    planted = f"{name_base(live_db)}_prev_29991231T235959999Z"
    pg.sql(sql.SQL("CREATE DATABASE {} TEMPLATE chinook_source").format(sql.Identifier(planted)))
    res = restore(pg, live_db, dumps["chinook"]["custom"], keep_previous=1)
    assert previous_copies(pg, live_db) == [res.previous_db] and planted in pg.databases()
    restore(pg, live_db, rollback=True)
    assert invoice_lines(pg, live_db) == 0 and planted in pg.databases()


def test_keep_previous(pg: PgServer, dumps, live_db: str):
    made = [
        restore(pg, live_db, dumps["chinook"][fmt], keep_previous=2).previous_db for fmt in ("custom", "tar", "plain")
    ]
    assert previous_copies(pg, live_db) == [made[2], made[1]] and made[0] not in pg.databases()
    res = restore(pg, live_db, dumps["chinook"]["directory"], keep_previous=0)
    assert previous_copies(pg, live_db) == [] and sorted(res.dropping) == sorted([made[2], made[1], res_prev(res)])
    assert res.rollback == {} and res.previous_db == "" and res.rollback_sql == []
    assert ours(pg, live_db) == {live_db}


def test_old_copies_are_dropped_after_the_run_returns(pg: PgServer, dumps, live_db: str):
    """The copy beyond keep_previous is closed when the run returns; a detached session drops it and its records."""
    first = restore(pg, live_db, dumps["chinook"]["custom"])
    oid = pg.sql("SELECT oid FROM pg_database WHERE datname = %s", (first.previous_db,))[0][0]
    second = restore(pg, live_db, dumps["chinook"]["tar"])
    assert second.dropping == [first.previous_db] and second.dropped == [] and second.changed
    assert any(f'dropping old copy "{first.previous_db}" after this run returns' in line for line in second.log)
    left = pg.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (first.previous_db,))
    assert left in ([], [(False,)]), "the copy handed to the background drop is still open"
    assert previous_copies(pg, live_db) == [second.previous_db] and first.previous_db not in pg.databases()
    for table in ("restored", "copies", "blocks"):
        query = sql.SQL("SELECT count(*) FROM pgops_dbrestore.{} WHERE datoid = %s").format(sql.Identifier(table))
        assert pg.sql(query, (oid,)) == [(0,)], f"a record of the dropped copy is left in {table}"


def test_the_next_run_waits_for_the_background_drop(pg: PgServer, dumps, live_db: str):
    """Whoever holds the prune key as a superuser stands for a drop still running: the next run waits for it."""
    src = dumps["chinook"]["custom"]
    restore(pg, live_db, src)
    done: dict = {}
    with pg.connect() as drop_session:
        drop_session.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (PRUNE_CLASS, live_db))
        run = threading.Thread(target=lambda: done.update(res=restore(pg, live_db, src, force=True)))
        run.start()
        _wait_for(lambda: pg.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
                                 "AND granted", (LOCK_CLASS,))[0][0] == 1)  # fmt: skip
        held = time.monotonic()
        time.sleep(1)  # however long the drop takes, the run waits it out
        drop_session.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (PRUNE_CLASS, live_db))
        waited_ms = (time.monotonic() - held) * 1000
    run.join()
    assert done["res"].changed and done["res"].phases_ms["lock"] >= waited_ms


def test_old_copies_are_dropped_in_the_run_when_no_session_can_take_them(pg: PgServer, dumps, live_db: str,
                                                                         monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    """A background session that ends before it took the drops (no psycopg, no connection): the run drops them."""
    first = restore(pg, live_db, dumps["chinook"]["custom"])
    monkeypatch.setattr(pruner, "_DROP_SCRIPT", "import sys; sys.exit(1)")
    second = restore(pg, live_db, dumps["chinook"]["tar"])
    assert second.dropped == [first.previous_db] and second.dropping == []
    assert first.previous_db not in pg.databases() and previous_copies(pg, live_db) == [second.previous_db]


def res_prev(res) -> str:
    """The previous copy the run made (and, with keep_previous=0, dropped again)."""
    return res.renamed[0].split(" -> ")[1]


def test_settings_carry_over(pg: PgServer, dumps, live_db: str):
    ident = sql.Identifier(live_db)
    pg.sql("CREATE ROLE pgops_app_owner NOLOGIN")
    pg.sql("CREATE ROLE pgops_reader NOLOGIN")
    try:
        for stmt in (
            "ALTER DATABASE {} OWNER TO pgops_app_owner",
            "REVOKE ALL ON DATABASE {} FROM PUBLIC",
            "GRANT CONNECT ON DATABASE {} TO pgops_reader WITH GRANT OPTION",
            'ALTER DATABASE {} SET search_path = "$user", public, "Odd, schema"',
            "ALTER DATABASE {} SET statement_timeout = '5min'",
            "ALTER ROLE pgops_reader IN DATABASE {} SET work_mem = '8MB'",
            "ALTER DATABASE {} CONNECTION LIMIT 77",
            "COMMENT ON DATABASE {} IS 'the app''s main db'",
        ):
            pg.sql(sql.SQL(stmt).format(ident))
        query = (
            "SELECT pg_get_userbyid(d.datdba), d.datacl::text, d.datconnlimit, shobj_description(d.oid, 'pg_database'),"
            " (SELECT array_agg(c ORDER BY c) FROM pg_db_role_setting s, unnest(s.setconfig) c "
            "  WHERE s.setdatabase = d.oid) FROM pg_database d WHERE d.datname = %s"
        )
        before = pg.sql(query, (live_db,))[0]
        res = restore(pg, live_db, dumps["chinook"]["custom"])
        after = pg.sql(query, (live_db,))[0]
        assert after == before
        assert not [line for line in res.log if "5min" in line or "Odd, schema" in line], "setting values logged"
    finally:
        restore(pg, live_db, rollback=True)
        for n in ours(pg, live_db):
            drop_database(pg, n)
        pg.sql("DROP ROLE pgops_app_owner")
        pg.sql("DROP ROLE pgops_reader")


@pytest.mark.newest_major
@pytest.mark.parametrize("method", ["allow_connections", "revoke_connect"])
def test_a_set_switches_behind_closed_doors_and_gives_back_exactly_what_it_took(pg: PgServer, dumps, live_db: str,
                                                                                method: str):  # fmt: skip
    """phase=close ends the sessions and keeps the restored copy closed through the switch; open gives the ACL back."""
    pg.sql(sql.SQL("GRANT CONNECT ON DATABASE {} TO pg_monitor WITH GRANT OPTION").format(sql.Identifier(live_db)))
    acl = pg.sql("SELECT datacl::text FROM pg_database WHERE datname = %s", (live_db,))
    app = pg.connect(live_db)
    try:
        assert restore(pg, live_db, dumps["chinook"]["tar"], phase="stage").staged
        closed = restore(pg, live_db, phase="close", block_new_connections=method)
        assert closed.closed_at and closed.terminated_count == 1 and app.closed is False
        with pytest.raises(Exception):  # noqa: B017 - the kept connection was ended
            app.execute("SELECT 1")
        res = restore(pg, live_db, dumps["chinook"]["tar"], phase="switch", block_new_connections=method)
        assert res.changed and res.previous_db
        if method == "allow_connections":  # the restored copy stays closed until phase=open
            assert not allows_connections(pg, live_db)
        else:
            assert pg.sql("SELECT has_database_privilege('pg_monitor', %s, 'CONNECT')", (live_db,)) == [(False,)]
        opened = restore(pg, live_db, phase="open")
        assert opened.opened_at and allows_connections(pg, live_db) and invoice_lines(pg, live_db) == 2240
        assert pg.sql("SELECT datacl::text FROM pg_database WHERE datname = %s", (live_db,)) == acl
        assert not restore(pg, live_db, phase="open").changed  # nothing held any more
        # the copy switched out keeps the state from before the close: a rollback reopens it as it was
        restore(pg, live_db, rollback=True)
        assert allows_connections(pg, live_db) and invoice_lines(pg, live_db) == 0
        assert pg.sql("SELECT datacl::text FROM pg_database WHERE datname = %s", (live_db,)) == acl
    finally:
        app.close()


def test_staged_set_switches_only_when_all_staged(pg: PgServer, dumps, live_db: str, tmp_path: Path):
    """Shards: stage every database, switch only if all verified; otherwise abort all, switch none."""
    second = live_db + " shard2"
    pg.sql(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(second), sql.Identifier(live_db)))
    broken = tmp_path / "broken.dump"
    broken.write_bytes(dumps["chinook"]["custom"].read_bytes()[:20000])
    try:
        staged = restore(pg, live_db, dumps["chinook"]["custom"], phase="stage")
        assert staged.staged and staged.changed and staging_name(live_db) in pg.databases()
        with pytest.raises(PgOpsError, match="pg_restore exited with 1"):
            restore(pg, second, broken, phase="stage")
        for db in (live_db, second):
            restore(pg, db, phase="abort")
        assert invoice_lines(pg, live_db) == 0 and invoice_lines(pg, second) == 0
        assert not [d for d in pg.databases() if d.endswith("_pgops_staging")]

        for db in (live_db, second):
            assert restore(pg, db, dumps["chinook"]["tar"], phase="stage").staged
        assert invoice_lines(pg, live_db) == 0, "stage must not switch"
        for db in (live_db, second):
            res = restore(pg, db, dumps["chinook"]["tar"], phase="switch")
            assert res.changed and res.previous_db
        assert invoice_lines(pg, live_db) == 2240 and invoice_lines(pg, second) == 2240
        again = restore(pg, second, dumps["chinook"]["tar"], phase="switch")
        assert not again.changed and again.steps_done == []
        with pytest.raises(PgOpsError, match=r"nothing is staged for .*: run phase=stage first"):
            restore(pg, second, dumps["chinook"]["custom"], phase="switch")
    finally:
        for n in ours(pg, second):
            drop_database(pg, n)


def test_swap_with_the_restart_fallback(pg: PgServer, dumps, live_db: str):
    """A login role that may not end other roles' sessions: the server restart ends them, the swap completes."""
    pg.sql("CREATE ROLE pgops_owner_nosignal LOGIN PASSWORD 'pw' CREATEDB")
    pg.sql(sql.SQL("ALTER DATABASE {} OWNER TO pgops_owner_nosignal").format(sql.Identifier(live_db)))
    records_kept_by(pg, "pgops_owner_nosignal")
    spec = RestartSpec(pg_ctl=str(pg.bindir / "pg_ctl"), data_dir=str(pg.datadir), become_user=pg.os_user)
    try:
        with storm_for(pg, live_db, clients=5) as storm:
            storm.wait_connected()
            res = restore_database(
                pg.params(login_user="pgops_owner_nosignal", login_password="pw"),
                RestoreRequest(db=live_db, src=str(dumps["chinook"]["custom"]), bindir=str(client_bindir()),
                               tool_args=("--no-owner", "--no-privileges"), fallback="restart", restart=spec),
            )  # fmt: skip
        assert res.restarted and res.terminated_count >= 5 and res.previous_db
        assert invoice_lines(pg, live_db) == 2240
        assert any("restarted PostgreSQL" in line for line in res.log)
    finally:
        pg.wait_ready()
        for n in ours(pg, live_db):
            drop_database(pg, n)
        pg.sql("DROP OWNED BY pgops_owner_nosignal")
        pg.sql("DROP ROLE pgops_owner_nosignal")


def test_check_mode_reports_the_steps_the_run_walks(pg: PgServer, dumps, live_db: str):
    restore(pg, live_db, dumps["chinook"]["custom"])  # a previous copy exists: the plan prunes it
    before, dbs = fingerprint_db(pg, live_db), pg.databases()
    checked = restore_database(pg.params(), RestoreRequest(db=live_db, src=str(dumps["chinook"]["tar"]),
                                                           bindir=str(client_bindir())), check_mode=True)  # fmt: skip
    assert checked.changed and checked.format == "tar" and checked.steps_done == []
    assert checked.diff["before"]["marker"]["format"] == "custom"
    assert checked.diff["after"]["marker"]["format"] == "tar"
    assert fingerprint_db(pg, live_db) == before and pg.databases() == dbs
    done = restore(pg, live_db, dumps["chinook"]["tar"])
    assert no_stamps(done.steps_done) == no_stamps(checked.plan) and len(checked.plan) == 4
    assert [s.split(" ")[0] for s in checked.plan] == ["create", "verify", "close", "drop"]


def test_swap_under_a_reconnecting_storm(pg: PgServer, dumps, live_db: str):
    for trial, fmt in enumerate(("custom", "plain", "directory")):
        with storm_for(pg, live_db, clients=60) as storm:
            storm.wait_connected()
            old = backends(pg, live_db)
            since = storm.connects_now()
            res = restore(pg, live_db, dumps["chinook"][fmt])
            assert res.terminated_count >= 60, f"trial {trial}"
            assert {s["pid"] for s in res.terminated} >= old
            assert res.switch_window_ms > 0
            # the clients came back: every one of them holds a new backend of the restored database
            _wait_for(lambda old=old: len(backends(pg, live_db) - old) >= 60, timeout=30)
            storm.wait_reconnected(since, timeout=30)
        assert invoice_lines(pg, live_db) == 2240


def backends(pg: PgServer, db: str) -> set[int]:
    return {r[0] for r in pg.sql("SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name LIKE "
                                 "'storm-%%'", (db,))}  # fmt: skip


def test_concurrent_runs_one_gets_the_lock_error(pg: PgServer, dumps, live_db: str, tmp_path: Path):
    big = tmp_path / "big.dump"
    _pgbench_dump(pg, big, scale=3)
    before = fingerprint_db(pg, live_db)
    outcome: dict[str, object] = {}

    def first() -> None:
        try:
            outcome["first"] = restore(pg, live_db, big, jobs=1)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["first"] = exc

    worker = threading.Thread(target=first)
    worker.start()
    _wait_for(lambda: staging_name(live_db) in pg.databases())
    with pytest.raises(PgOpsError, match=r"another restore of database .* is running") as err:
        restore(pg, live_db, dumps["chinook"]["custom"])
    assert err.value.sqlstate == LOCK_NOT_AVAILABLE and err.value.details["changed"] is False
    assert fingerprint_db(pg, live_db) == before  # the loser changed nothing
    worker.join()
    assert not isinstance(outcome["first"], Exception), outcome["first"]
    assert pg.sql("SELECT count(*) FROM pgbench_accounts", dbname=live_db)[0][0] == 300000


def test_hostile_dump_paths(pg: PgServer, dumps, live_db: str, tmp_path: Path):
    odd = tmp_path / "a dir; with 'quotes'" / ".." / 'dumps "ü" $(touch pwned)'
    odd.mkdir(parents=True)
    src = odd / "-x; rm -rf ~ .dump"
    shutil.copy(dumps["chinook"]["custom"], src)
    res = restore(pg, live_db, src)
    assert res.changed and fingerprint_db(pg, live_db) == fingerprint_db(pg, "chinook_source")
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


def test_long_database_name_fits(pg: PgServer, dumps):
    db = "a_very_long_database_name_for_an_application_ü_" + "x" * 8  # 57 bytes
    try:
        restore(pg, db, dumps["chinook"]["plain"])
        res = restore(pg, db, dumps["chinook"]["custom"])
        assert len(res.previous_db.encode()) <= 63 and res.previous_db in pg.databases()
        back = restore(pg, db, rollback=True)
        assert back.changed and all(len(n.encode()) <= 63 for n in ours(pg, db))
        assert len(ours(pg, db)) == 2  # the live one and the undone copy
    finally:
        for n in ours(pg, db):
            drop_database(pg, n)


# --- crashes: SIGKILL at named points, never at a moment guessed with a sleep ---------------------------


def kill(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the restore is not running any more: nothing to kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def wait_lock_free(pg: PgServer) -> None:
    """The killed run's backend is gone with its advisory lock (the server notices the closed socket)."""
    _wait_for(lambda: pg.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s",
                             (LOCK_CLASS,))[0][0] == 0)  # fmt: skip


# the step names of a swap with something to prune, in order; "switched" is inside the switch, after the renames
KILL_POINTS = ("stage", "verify", "switch", "switched", "prune")


@pytest.mark.parametrize("iteration", range(CRASH_REPEAT), ids=lambda i: f"run{i}")
@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_at_a_named_step_leaves_a_working_database(pg: PgServer, dumps, live_db: str, tmp_path: Path,
                                                          point: str, iteration: int):  # fmt: skip
    """SIGKILL right before a step under a reconnecting storm: the live database is whole (old or new data),
    open, and the next run cleans up whatever the killed one left."""
    src = dumps["chinook"]["custom"]
    first = restore(pg, live_db, src)  # a previous copy: the killed run has one to prune
    pg.sql("INSERT INTO genre (genre_id, name) VALUES (9004, 'before the killed run')", dbname=live_db)
    old, new = fingerprint_db(pg, live_db), fingerprint_db(pg, "chinook_source")
    staging = staging_name(live_db)
    with storm_for(pg, live_db, clients=20) as storm:
        storm.wait_connected()
        proc = paused_restore(pg, {"db": live_db, "src": str(src), "jobs": 1, "force": True}, point, tmp_path)
        kill(proc)
        _wait_for(lambda: allows_connections(pg, live_db), timeout=30)
        storm.wait_connected(timeout=30)  # the app works against whichever copy holds the name now
    switched = point in ("switched", "prune")
    assert fingerprint_db(pg, live_db) == (new if switched else old), f"killed before {point}: wrong data"
    assert (staging in pg.databases()) == (point in ("verify", "switch")), "unexpected staging copy"
    assert allows_connections(pg, live_db)

    wait_lock_free(pg)
    nxt = restore(pg, live_db, src, force=True)
    assert nxt.changed and (staging in nxt.dropped) == (point in ("verify", "switch"))
    assert fingerprint_db(pg, live_db) == new and allows_connections(pg, live_db)
    assert staging not in pg.databases() and previous_copies(pg, live_db) == [nxt.previous_db]
    assert first.previous_db not in pg.databases(), "the copy the killed run was to prune is still there"
    assert ours(pg, live_db) == {live_db, nxt.previous_db}, "a copy was left behind"


@pytest.mark.parametrize("iteration", range(CRASH_REPEAT), ids=lambda i: f"run{i}")
def test_killed_while_pg_restore_writes_then_next_run_cleans_up(pg: PgServer, dumps, live_db: str, tmp_path: Path,
                                                                iteration: int):  # fmt: skip
    big = tmp_path / "big.dump"
    _pgbench_dump(pg, big, scale=3)
    before = fingerprint_db(pg, live_db)
    staging = staging_name(live_db)
    proc = restore_process(pg, {"db": live_db, "src": str(big), "jobs": 1})
    copying = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query ILIKE 'COPY %%'"
    _wait_for(lambda: pg.sql(copying, (staging,))[0][0] > 0 or proc.poll() is not None, timeout=60)
    kill(proc)
    assert fingerprint_db(pg, live_db) == before and allows_connections(pg, live_db)
    # the orphaned pg_restore died with its parent: nobody writes into staging any more
    _wait_for(lambda: pg.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (staging,))[0][0] == 0)
    wait_lock_free(pg)
    res = restore(pg, live_db, dumps["chinook"]["custom"])
    assert staging in res.dropped and res.changed
    assert res.plan[0] == f'drop "{staging}" (left behind by an interrupted run)'
    assert fingerprint_db(pg, live_db) == fingerprint_db(pg, "chinook_source")


def _pgbench_dump(pg: PgServer, dest: Path, scale: int) -> None:
    db = f"pgbench_s{scale}"
    if db not in pg.databases():
        pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        subprocess.run([str(client_bindir() / "pgbench"), "-i", "-q", "-s", str(scale), db], env=pg.client_env(),
                       check=True, capture_output=True)  # fmt: skip
    make_dump(pg, db, "custom", dest)


def _wait_for(cond, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)
