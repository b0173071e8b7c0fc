"""pg_restore_db logic against real servers: formats, failures, idempotency, rollback, locking, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import (
    RestoreRequest,
    list_previous,
    restore_database,
    staging_name,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import RestartSpec
from tests.conftest import drop_database
from tests.harness.datasets import CHINOOK
from tests.harness.dumps import FORMATS, make_dump
from tests.harness.pg import PgServer, client_bindir
from tests.integration.conftest import PAGILA_MIN_MAJOR, fingerprint_db
from tests.integration.test_terminate import storm_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.restore_majors


def restore(pg: PgServer, db: str, src: Path | str | None = None, **kw):
    return restore_database(pg.params(), RestoreRequest(db=db, src=str(src) if src else None,
                                                        bindir=str(client_bindir()), **kw))  # fmt: skip


def databases(pg: PgServer) -> set[str]:
    return {r[0] for r in pg.sql("SELECT datname FROM pg_database")}


def allows_connections(pg: PgServer, db: str) -> bool:
    return pg.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (db,)) == [(True,)]


def invoice_lines(pg: PgServer, db: str) -> int:
    return pg.sql("SELECT count(*) FROM invoice_line", dbname=db)[0][0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_restores_chinook_exactly(pg: PgServer, dumps, live_db: str, fmt: str):
    expected = fingerprint_db(pg, "chinook_source")
    res = restore(pg, live_db, dumps["chinook"][fmt])
    assert res.changed and res.format == fmt and res.previous_db in databases(pg)
    assert fingerprint_db(pg, live_db) == expected
    assert res.marker_after["sha256"] == res.sha256 and res.marker_after["format"] == fmt
    assert staging_name(live_db) not in databases(pg)
    assert {"inspect", "preflight", "stage", "verify", "switch", "cleanup", "total"} <= set(res.phases_ms)
    assert res.rollback == {"db": live_db, "rollback": True} and len(res.rollback_sql) == 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_restores_pagila_exactly(pg: PgServer, dumps, fmt: str):
    if pg.major < PAGILA_MIN_MAJOR:
        pytest.skip("the pagila sample uses virtual generated columns (PostgreSQL 18+)")
    db = "pagila restored"
    try:
        res = restore(pg, db, dumps["pagila"][fmt])
        assert res.changed and not res.previous_db  # a new database: nothing to swap
        assert fingerprint_db(pg, db) == fingerprint_db(pg, "pagila_source")
    finally:
        drop_database(pg, db)


def test_chinook_original_sql_with_its_own_create_database(pg: PgServer, live_db: str):
    """The original chinook file drops, creates and enters its own database: those lines are left out."""
    res = restore(pg, live_db, CHINOOK)
    assert res.format == "plain"
    assert res.stripped_statements == ["DROP DATABASE IF EXISTS chinook;", "CREATE DATABASE chinook;", "\\c chinook;"]
    assert fingerprint_db(pg, live_db) == fingerprint_db(pg, "chinook_source")
    assert "chinook" not in databases(pg)


def _broken_dumps(dumps, tmp: Path) -> dict[str, tuple[Path, str]]:
    custom = dumps["chinook"]["custom"].read_bytes()
    plain = dumps["chinook"]["plain"].read_text()
    cases = {
        "truncated": (custom[: len(custom) * 2 // 3], "pg_restore exited"),
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
    dbs = databases(pg)
    with pytest.raises(PgOpsError) as err:
        restore(pg, live_db, path, strategy=strategy)
    if strategy == "replace" and case == "bad sql":
        # a plain dump that reads fine but fails to load: replace had already dropped the database
        assert "was dropped before the restore" in str(err.value)
        return
    assert expect in str(err.value), str(err.value)
    assert fingerprint_db(pg, live_db) == before, "the live database changed"
    assert databases(pg) == dbs, "a staging or previous copy was left behind"
    assert pg.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (live_db,))[0][0]


def test_verify_query_false_switches_nothing(pg: PgServer, dumps, live_db: str):
    before = fingerprint_db(pg, live_db)
    with pytest.raises(PgOpsError, match="verify_query returned False"):
        restore(pg, live_db, dumps["chinook"]["custom"], verify_query="SELECT count(*) > 1000000 FROM track")
    assert fingerprint_db(pg, live_db) == before and staging_name(live_db) not in databases(pg)
    res = restore(pg, live_db, dumps["chinook"]["custom"], verify_query="SELECT count(*) > 0 FROM track", analyze=True)
    assert res.changed


def test_same_dump_twice_force_and_rollback(pg: PgServer, dumps, live_db: str):
    src = dumps["chinook"]["custom"]
    first = restore(pg, live_db, src)
    assert first.changed and invoice_lines(pg, live_db) == 2240
    t = time.monotonic()
    second = restore(pg, live_db, src)
    assert not second.changed and time.monotonic() - t < 5
    assert second.marker_before == second.marker_after or second.marker_after is None
    forced = restore(pg, live_db, src, force=True)
    assert forced.changed and forced.previous_db and len(list_previous(pg.connect(), live_db)) == 1

    back = restore(pg, live_db, rollback=True)
    assert back.changed and back.previous_db == forced.previous_db
    assert invoice_lines(pg, live_db) == 2240  # the forced restore replaced the first restore: same data
    with pytest.raises(PgOpsError, match="no previous copy"):
        restore(pg, live_db, rollback=True)


def test_rollback_brings_the_old_rows_back(pg: PgServer, dumps, live_db: str):
    pg.sql("INSERT INTO genre (genre_id, name) VALUES (9999, 'only in the live db')", dbname=live_db)
    res = restore(pg, live_db, dumps["chinook"]["plain.zst"])
    assert invoice_lines(pg, live_db) == 2240
    back = restore(pg, live_db, rollback=True)
    assert invoice_lines(pg, live_db) == 0
    assert pg.sql("SELECT name FROM genre WHERE genre_id = 9999", dbname=live_db) == [("only in the live db",)]
    assert pg.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (live_db,))[0][0]
    undone = [d for d in databases(pg) if "_undone_" in d]
    assert len(undone) == 1 and res.previous_db == back.previous_db


def test_keep_previous(pg: PgServer, dumps, live_db: str):
    for fmt in ("custom", "tar", "plain"):
        restore(pg, live_db, dumps["chinook"][fmt], keep_previous=2)
    assert len(list_previous(pg.connect(), live_db)) == 2
    res = restore(pg, live_db, dumps["chinook"]["directory"], keep_previous=0)
    assert list_previous(pg.connect(), live_db) == [] and len(res.dropped) == 3
    assert res.rollback == {} and res.previous_db == ""


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
        restore(pg, live_db, dumps["chinook"]["custom"])
        after = pg.sql(query, (live_db,))[0]
        assert after[0] == "pgops_app_owner" and after[2:] == before[2:]
        assert sorted(after[1].strip("{}").split(",")) == sorted(before[1].strip("{}").split(","))
    finally:
        restore(pg, live_db, rollback=True)
        for n in list(databases(pg)):
            if n.startswith(live_db):
                drop_database(pg, n)
        pg.sql("DROP ROLE pgops_app_owner")
        pg.sql("DROP ROLE pgops_reader")


def test_staged_set_switches_only_when_all_staged(pg: PgServer, dumps, live_db: str, tmp_path: Path):
    """Shards: stage every database, switch only if all verified; otherwise abort all, switch none."""
    second = live_db + " shard2"
    pg.sql(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(second), sql.Identifier(live_db)))
    broken = tmp_path / "broken.dump"
    broken.write_bytes(dumps["chinook"]["custom"].read_bytes()[:20000])
    try:
        assert restore(pg, live_db, dumps["chinook"]["custom"], phase="stage").staged
        with pytest.raises(PgOpsError):
            restore(pg, second, broken, phase="stage")
        for db in (live_db, second):
            restore(pg, db, phase="abort")
        assert invoice_lines(pg, live_db) == 0 and invoice_lines(pg, second) == 0
        assert not [d for d in databases(pg) if d.endswith("_pgops_staging")]

        for db in (live_db, second):
            assert restore(pg, db, dumps["chinook"]["tar"], phase="stage").staged
        assert invoice_lines(pg, live_db) == 0, "stage must not switch"
        for db in (live_db, second):
            res = restore(pg, db, dumps["chinook"]["tar"], phase="switch")
            assert res.changed and res.previous_db
        assert invoice_lines(pg, live_db) == 2240 and invoice_lines(pg, second) == 2240
        again = restore(pg, second, dumps["chinook"]["tar"], phase="switch")
        assert not again.changed
        with pytest.raises(PgOpsError, match="nothing is staged"):
            restore(pg, second, dumps["chinook"]["custom"], phase="switch")
    finally:
        for n in list(databases(pg)):
            if n.startswith(second[:20]) and n != live_db:
                drop_database(pg, n)


def test_swap_with_the_restart_fallback(pg: PgServer, dumps, live_db: str):
    """A login role that may not end other roles' sessions: the server restart ends them, the swap completes."""
    pg.sql("CREATE ROLE pgops_owner_nosignal LOGIN PASSWORD 'pw' CREATEDB")
    pg.sql(sql.SQL("ALTER DATABASE {} OWNER TO pgops_owner_nosignal").format(sql.Identifier(live_db)))
    spec = RestartSpec(pg_ctl=str(pg.bindir / "pg_ctl"), data_dir=str(pg.datadir), become_user=pg.os_user)
    try:
        with storm_for(pg, live_db, clients=5) as storm:
            storm.wait_connected()
            res = restore_database(
                pg.params(login_user="pgops_owner_nosignal", login_password="pw"),
                RestoreRequest(db=live_db, src=str(dumps["chinook"]["custom"]), bindir=str(client_bindir()),
                               restore_args=("--no-owner", "--no-privileges"), fallback="restart", restart=spec),
            )  # fmt: skip
        assert res.restarted and res.terminated >= 5 and res.previous_db
        assert invoice_lines(pg, live_db) == 2240
        assert any("restarted PostgreSQL" in line for line in res.log)
    finally:
        pg.wait_ready()
        for n in list(databases(pg)):
            if n.startswith(live_db):
                drop_database(pg, n)
        pg.sql("DROP ROLE pgops_owner_nosignal")


def test_check_mode_changes_nothing(pg: PgServer, dumps, live_db: str):
    before, dbs = fingerprint_db(pg, live_db), databases(pg)
    res = restore_database(pg.params(), RestoreRequest(db=live_db, src=str(dumps["chinook"]["tar"]),
                                                       bindir=str(client_bindir())), check_mode=True)  # fmt: skip
    assert res.changed and res.format == "tar"
    assert any(step.startswith("rename") for step in res.plan)
    assert res.diff["before"]["marker"] is None and res.diff["after"]["marker"]["format"] == "tar"
    assert fingerprint_db(pg, live_db) == before and databases(pg) == dbs


def test_swap_under_a_reconnecting_storm(pg: PgServer, dumps, live_db: str):
    for trial, fmt in enumerate(("custom", "plain", "directory")):
        with storm_for(pg, live_db, clients=60) as storm:
            storm.wait_connected()
            res = restore(pg, live_db, dumps["chinook"][fmt])
            assert res.terminated >= 60, f"trial {trial}"
            assert res.switch_window_ms > 0
            time.sleep(0.3)
            assert sum(1 for s in storm.stats if s.last_ok > time.monotonic() - 0.5) > 0, "clients did not come back"
        assert invoice_lines(pg, live_db) == 2240


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
    _wait_for(lambda: staging_name(live_db) in databases(pg))
    with pytest.raises(PgOpsError, match=r"another restore of database .* is running"):
        restore(pg, live_db, dumps["chinook"]["custom"])
    assert fingerprint_db(pg, live_db) == before  # the loser changed nothing
    worker.join()
    assert not isinstance(outcome["first"], Exception), outcome["first"]
    assert pg.sql("SELECT count(*) FROM pgbench_accounts", dbname=live_db)[0][0] == 300000


def restore_in_a_process(pg: PgServer, db: str, src: Path) -> subprocess.Popen:
    """restore_database in a process of its own, to be killed."""
    script = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "from tests.harness.pg import client_bindir\n"
        "from ansible_collections.pgops.dbrestore.plugins.module_utils import postgres, restore as r\n"
        "import json; p = postgres.ConnParams(**json.loads(sys.argv[3]))\n"
        "req = r.RestoreRequest(db=sys.argv[4], src=sys.argv[5], jobs=1, bindir=str(client_bindir()))\n"
        "r.restore_database(p, req)\n"
    )
    params = {k: v for k, v in pg.params().__dict__.items() if k != "connect_params"}
    return subprocess.Popen([sys.executable, "-c", script, str(ROOT), str(ROOT / ".cache" / "collections"),
                             json.dumps(params), db, str(src)])  # fmt: skip


def test_killed_at_any_moment_the_database_reopens_with_its_data(pg: PgServer, dumps, live_db: str):
    """SIGKILL at moments spread over a restore under a storm, the switch window included."""
    old, new = fingerprint_db(pg, live_db), fingerprint_db(pg, "chinook_source")
    for delay in (0.3, 0.6, 0.9, 1.2, 1.5, 1.8):
        with storm_for(pg, live_db, clients=30) as storm:
            storm.wait_connected()
            proc = restore_in_a_process(pg, live_db, dumps["chinook"]["custom"])
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            _wait_for(lambda: allows_connections(pg, live_db), timeout=10)
        assert fingerprint_db(pg, live_db) in (old, new), f"killed after {delay} s: the data is neither"
        if fingerprint_db(pg, live_db) == new:  # the switch committed: back to the old data for the next trial
            restore(pg, live_db, rollback=True)
        for n in databases(pg):
            if n.startswith(live_db) and n != live_db:
                drop_database(pg, n)


def test_killed_midway_then_next_run_cleans_up(pg: PgServer, dumps, live_db: str, tmp_path: Path):
    big = tmp_path / "big.dump"
    _pgbench_dump(pg, big, scale=3)
    before = fingerprint_db(pg, live_db)
    proc = restore_in_a_process(pg, live_db, big)
    staging = staging_name(live_db)
    _wait_for(lambda: pg.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (staging,))[0][0] > 0)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert fingerprint_db(pg, live_db) == before
    assert pg.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (live_db,))[0][0]
    # the orphaned pg_restore died with its parent: nobody writes into staging any more
    _wait_for(lambda: pg.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (staging,))[0][0] == 0)

    res = restore(pg, live_db, dumps["chinook"]["custom"])
    assert staging in res.dropped and res.changed
    assert fingerprint_db(pg, live_db) == fingerprint_db(pg, "chinook_source")


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
        assert len(res.previous_db.encode()) <= 63 and res.previous_db in databases(pg)
        restore(pg, db, rollback=True)
    finally:
        for n in list(databases(pg)):
            if n.startswith(db[:20]):
                drop_database(pg, n)


def _pgbench_dump(pg: PgServer, dest: Path, scale: int) -> None:
    db = f"pgbench_s{scale}"
    if db not in databases(pg):
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
