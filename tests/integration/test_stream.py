"""A database refreshed from a source server (another instance and major, same run): pg_dump streamed, scrubbed.

The source is production: it must only be read. Its autovacuum is off, so no transaction id is
handed out on it unless our run writes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.copies import staging_name
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from tests.conftest import drop_database
from tests.harness.ansible_run import ansible_env
from tests.harness.pg import SUPERUSER, SUPERUSER_PASSWORD, PgServer, client_bindir, start_server
from tests.harness.restore_process import paused_restore
from tests.integration.test_playbooks import login_vars
from tests.integration.test_progress import GATE_ROLE, GATE_SQL

pytestmark = pytest.mark.newest_major

SOURCE_MAJOR = 15  # an older major than the target's, as production often is
ROOT = Path(__file__).resolve().parents[2]
# the host_vars of docs/sanitize.md: the documented source, with this machine's address and login
DOCUMENTED = yaml.safe_load(re.search(r"```yaml\n(.*?)```", (ROOT / "docs" / "sanitize.md").read_text(), re.S)[1])
APP, PROD, STAGING = "shop", DOCUMENTED["restore_source"]["db"], "shop_staging"
SCRUB = "UPDATE users SET email = 'user' || id || '@example.invalid', api_key = NULL"
PRODUCTION = """
CREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL UNIQUE, api_key text);
INSERT INTO users (email, api_key) SELECT 'person' || g || '@gmail.com', 'live_' || g FROM generate_series(1, 500) g;
CREATE TABLE events (id bigserial PRIMARY KEY, user_id bigint REFERENCES users, payload text);
ALTER TABLE events ADD COLUMN dropped int, ADD COLUMN payload_length int GENERATED ALWAYS AS (length(payload)) STORED;
ALTER TABLE events DROP COLUMN dropped;
INSERT INTO events (user_id, payload) SELECT 1 + g % 500, repeat(md5(g::text), 3)
    || CASE WHEN g % 1000 = 0 THEN E'\\tü€\\n𝄞\\\\' ELSE '' END FROM generate_series(1, 100000) g;
CREATE TABLE "Odd.Name*" ("a""b" int PRIMARY KEY);
INSERT INTO "Odd.Name*" SELECT generate_series(1, 300);
CREATE TABLE visits (day date NOT NULL, n int) PARTITION BY RANGE (day);
CREATE TABLE visits_2025 PARTITION OF visits FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE visits_2026 PARTITION OF visits FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO visits SELECT '2025-06-01'::date + g, g FROM generate_series(1, 400) g;
CREATE SEQUENCE invoice_numbers START 1000;
SELECT setval('invoice_numbers', 4242);
SELECT lo_from_bytea(0, 'a large object');
CREATE MATERIALIZED VIEW user_counts AS SELECT user_id, count(*) FROM events GROUP BY user_id;
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory):
    """Production: its own server, the app's role owning the tables."""
    server = start_server(SOURCE_MAJOR, autovacuum="off")
    server.sql(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(APP)))
    server.sql(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(PROD), sql.Identifier(APP)))
    with server.connect(PROD) as conn:
        conn.execute(f"SET ROLE {APP}")
        conn.execute(PRODUCTION)
    yield server
    server.destroy()


@pytest.fixture
def staging(pg: PgServer):
    """The staging server's database, with data of its own that a failed refresh must leave alone."""
    pg.sql(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(APP)))
    pg.sql(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(STAGING), sql.Identifier(APP)))
    pg.sql("CREATE TABLE users (id int, email text); INSERT INTO users VALUES (1, 'old@staging.invalid')",
           dbname=STAGING)  # fmt: skip
    yield STAGING
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE 'shop_%'"):
        drop_database(pg, name)
    pg.sql(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(APP)))
    pg.sql(sql.SQL("DROP ROLE {}").format(sql.Identifier(APP)))


def source_options(src: PgServer, **kw) -> dict:
    return {**DOCUMENTED["restore_source"], "host": "127.0.0.1", "port": src.port, "user": SUPERUSER,
            "password": SUPERUSER_PASSWORD, "ssl_mode": "disable", **kw}  # fmt: skip


# one plain stream into psql, and parallel pg_dump | pg_restore streams (events split over psql pairs)
STREAMS = pytest.mark.parametrize("jobs", [1, 2])


def refresh(pg: PgServer, src: PgServer, check_mode: bool = False, **kw):
    req = RestoreRequest(db=STAGING, source=source_options(src), bindir=str(client_bindir()), **kw)
    return restore_database(pg.params(), req, check_mode=check_mode)


def next_xid(src: PgServer) -> int:
    """The next transaction id of the source server (reading it hands none out)."""
    return src.sql("SELECT txid_snapshot_xmax(txid_current_snapshot())")[0][0]


def row_changes(src: PgServer) -> tuple[int, int]:
    """Commits and rows written in the source database, by the statistics (read from another database)."""
    return src.sql("SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database "
                   "WHERE datname = %s", (PROD,))[0]  # fmt: skip


def staging_users(pg: PgServer) -> list:
    return pg.sql("SELECT email FROM users ORDER BY id", dbname=STAGING)


@STREAMS
def test_refresh_holds_the_source_scrubbed_and_the_source_was_only_read(pg: PgServer, source: PgServer, staging,
                                                                        jobs: int):  # fmt: skip
    xid, (commits, writes) = next_xid(source), row_changes(source)
    planned = refresh(pg, source, check_mode=True, sanitize=[SCRUB], owner=APP, jobs=jobs)
    assert planned.plan[0].startswith(f'create "{staging_name(STAGING)}" and stream postgres@127.0.0.1:')
    assert [p.split(" ")[0] for p in planned.plan] == ["create", "sanitize", "verify", "close"]
    assert ("(tables of at least 256 MB: 2 COPY sessions each)" in planned.plan[0]) == (jobs > 1), planned.plan
    res = refresh(pg, source, sanitize=[SCRUB], owner=APP, verify_query="SELECT count(*) = 100000 FROM events",
                  jobs=jobs, parallel_table_mb=1)  # fmt: skip
    assert res.changed and res.format == "server" and res.steps_done == res.plan and res.previous_db
    assert res.marker_after["src"] == f"postgres@127.0.0.1:{source.port}/{PROD}" and res.marker_after["sanitize"]
    assert pg.sql("SELECT count(*), count(*) FILTER (WHERE email LIKE '%@example.invalid' AND api_key IS NULL) "
                  "FROM users", dbname=STAGING) == [(500, 500)]  # fmt: skip
    assert pg.sql("SELECT count(*), sum(length(payload)) FROM events", dbname=STAGING) == source.sql(
        "SELECT count(*), sum(length(payload)) FROM events", dbname=PROD
    )
    assert pg.sql("SELECT tableowner FROM pg_tables WHERE tablename = 'users'", dbname=STAGING) == [(APP,)]
    # the source: no transaction id handed out, and, once the run's commits are counted, no row written
    assert next_xid(source) == xid
    deadline = time.monotonic() + 10
    while row_changes(source)[0] < commits + 2:  # the preflight's and pg_dump's transactions
        assert time.monotonic() < deadline, "the source's statistics never counted the run's transactions"
        time.sleep(0.05)
    assert row_changes(source)[1] == writes
    assert source.sql("SELECT count(*) FROM users WHERE email LIKE '%@gmail.com'", dbname=PROD) == [(500,)]


def contents(server: PgServer, dbname: str) -> dict:
    """Every table's rows (a count and a digest), the sequence, the large objects and the indexes."""
    tables = server.sql("SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables UNION "
                        "SELECT format('%I.%I', schemaname, matviewname) FROM pg_matviews", dbname=dbname)  # fmt: skip
    digest = "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {} t"
    found = {name: server.sql(digest.format(name), dbname=dbname)[0] for (name,) in tables}
    found["sequence"] = server.sql("SELECT last_value FROM invoice_numbers", dbname=dbname)
    found["large objects"] = server.sql("SELECT encode(lo_get(oid), 'escape') FROM pg_largeobject_metadata",
                                        dbname=dbname)  # fmt: skip
    found["indexes"] = server.sql("SELECT indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
                                  dbname=dbname)  # fmt: skip
    return found


def test_parallel_streams_carry_every_table_sequence_and_large_object(pg: PgServer, source: PgServer, staging):
    planned = refresh(pg, source, check_mode=True, jobs=3, parallel_table_mb=1, owner=APP)
    assert planned.plan[0].endswith(" into it (tables of at least 1 MB: 3 COPY sessions each)"), planned.plan
    res = refresh(pg, source, jobs=3, parallel_table_mb=1, owner=APP)
    log = "\n".join(res.log)
    assert "(3 pg_dump | pg_restore streams on one snapshot, indexes by 3 jobs, no file)" in log, log
    # events (a generated column, a dropped one, escapes and multibyte text): three ranges of its pages
    assert "loaded public.events by 3 COPY sessions each, a range of pages each (at least 1 MB" in log, log
    expected = contents(source, PROD)
    assert len(expected) == 10 and len(expected["indexes"]) == 4  # 6 tables and the view; 4 indexes
    assert contents(pg, STAGING) == expected


@STREAMS
def test_source_dying_midway_leaves_the_live_copy_intact(pg: PgServer, source: PgServer, staging, tmp_path: Path,
                                                         jobs: int):  # fmt: skip
    request = {"db": STAGING, "source": source_options(source), "jobs": jobs, "parallel_table_mb": 1}
    proc = paused_restore(pg, request, "streaming", tmp_path)
    try:
        ended = source.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                           "AND application_name = 'pgops.dbrestore'", (PROD,))  # fmt: skip
        # the snapshot's session and the streams mid-COPY (false: a short stream that ended by itself meanwhile)
        assert ended and any(e == (True,) for e in ended), ended
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=60) != 0
    finally:  # a stopped run would hold the restore lock for the tests after this one
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert f"refresh from postgres@127.0.0.1:{source.port}/{PROD} failed" in err
    assert re.search(r"(pg_dump|psql) exited with", err), err  # a stream's reader: pg_dump, or psql of a split table
    assert staging_users(pg) == [("old@staging.invalid",)]
    assert staging_name(STAGING) not in {r[0] for r in pg.sql("SELECT datname FROM pg_database")}


@STREAMS
def test_killed_refresh_leaves_the_live_copy_intact(pg: PgServer, source: PgServer, staging, tmp_path: Path,
                                                    jobs: int):  # fmt: skip
    request = {"db": STAGING, "source": source_options(source), "jobs": jobs, "parallel_table_mb": 1}
    proc = paused_restore(pg, request, "streaming", tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30  # pg_dump and psql die with it: their sessions go
    while (
        source.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (PROD,))[0][0]
        or pg.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (staging_name(STAGING),))[0][0]
    ):
        assert time.monotonic() < deadline, "pg_dump or psql outlived the killed run"
        time.sleep(0.05)
    assert staging_users(pg) == [("old@staging.invalid",)]
    # the partly loaded staging copy is the next run's leftover: it drops it first
    assert refresh(pg, source, check_mode=True).plan[0].startswith(f'drop "{staging_name(STAGING)}"')


def test_unreachable_source_changes_nothing(pg: PgServer, source: PgServer, staging):
    closed = source_options(source, port=1)
    for check_mode in (True, False):
        req = RestoreRequest(db=STAGING, source=closed, bindir=str(client_bindir()))
        with pytest.raises(PgOpsError, match=r"nothing was changed.*the source database cannot be read") as err:
            restore_database(pg.params(), req, check_mode=check_mode)
        assert err.value.details["created"] == []
    assert staging_users(pg) == [("old@staging.invalid",)]


def test_the_playbook_refreshes_from_restore_source_without_printing_its_password(
    pg: PgServer, source: PgServer, staging, tmp_path: Path
):
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable, **login_vars(pg),
            "restore_bindir": str(client_bindir()), "restore_jobs": 1, "restore_source": source_options(source),
            "restore_sanitize": [SCRUB], "restore_verify_query": DOCUMENTED["restore_verify_query"]}  # fmt: skip
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"db": {"hosts": {"staging-db1": host}}}))
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), "pgops.dbrestore.restore",
            "-e", f"db={STAGING}", "-vvv"]  # fmt: skip  # -vvv: the module arguments are printed
    proc = subprocess.run(argv, env=ansible_env(), capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"{STAGING}: restored from postgres@127.0.0.1:{source.port}/{PROD} (server format)" in out, out
    assert SUPERUSER_PASSWORD not in out and re.search(r"\n\s+password: VALUE_SPECIFIED_IN_NO_LOG_PARAMETER\n", out)
    assert pg.sql("SELECT count(*) FROM users WHERE email LIKE '%@example.invalid'", dbname=STAGING) == [(500,)]


# users, then table gate (test_progress.GATE_SQL), whose one row waits as COPY loads it into the staging copy
# until GATE_ROLE exists on that server (the source server has the role, so making the source is quick)
GATED = (
    """
CREATE TABLE users (id int PRIMARY KEY, email text);
INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 5000) g;
"""
    + GATE_SQL
)


@STREAMS
def test_refresh_progress_counts_the_sources_tables_bytes_and_indexes(pg: PgServer, source: PgServer, staging,
                                                                      tmp_path: Path, jobs: int):  # fmt: skip
    """The totals are the source's; a parallel refresh is counted from the staging copy as it loads (held here
    in table gate, users loaded), a plain stream as it goes to psql (ahead of it); at the end every count is whole."""
    source.sql(sql.SQL("CREATE ROLE {}").format(sql.Identifier(GATE_ROLE)))
    source.sql("CREATE DATABASE gated")
    try:
        source.sql(GATED, dbname="gated")
        size = source.sql("SELECT sum(pg_table_size(c)) FROM unnest(array['users', 'gate']::regclass[]) c",
                          dbname="gated")[0][0]  # fmt: skip
        path = tmp_path / f"{STAGING}.json"
        req = RestoreRequest(db=STAGING, source=source_options(source, db="gated"), bindir=str(client_bindir()),
                             jobs=jobs, progress_dir=str(tmp_path))  # fmt: skip
        done: list = []
        run = threading.Thread(target=lambda: done.append(restore_database(pg.params(), req)), daemon=True)
        run.start()
        try:
            deadline = time.monotonic() + 60
            while True:
                held = json.loads(path.read_text()) if path.exists() else {}
                if held.get("copying") and (jobs == 1 or held["tables_done"] == 1):
                    break
                assert run.is_alive() and time.monotonic() < deadline, held
                time.sleep(0.1)
            assert (held["tables_total"], held["indexes_total"]) == (2, 1), held
            if jobs > 1:  # the staging copy's tables as they fill (psql's one transaction hides them from us)
                assert [c["table"] for c in held["copying"]] == ["public.gate"] and held["indexes_done"] == 0, held
                assert held["bytes_total"] == size and held["bytes_done"] > 0, held
        finally:
            pg.sql(sql.SQL("CREATE ROLE {}").format(sql.Identifier(GATE_ROLE)))
            run.join(timeout=60)
        assert done and done[0].changed
        final = json.loads(path.read_text())
        assert final["state"] == "done" and final["percent"] == 100
        assert (final["tables_done"], final["indexes_done"]) == (2, 1), final
    finally:
        pg.sql(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(GATE_ROLE)))
        source.sql("DROP DATABASE gated")
        source.sql(sql.SQL("DROP ROLE {}").format(sql.Identifier(GATE_ROLE)))
