"""keep_tables: the live rows of a table (the app's login sessions) survive a restore, carried in the switch window."""

from __future__ import annotations

from pathlib import Path

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from tests.conftest import drop_database
from tests.harness.dumps import make_dump
from tests.harness.pg import SUPERUSER, SUPERUSER_PASSWORD, PgServer, client_bindir
from tests.integration.conftest import fingerprint_db

pytestmark = pytest.mark.newest_major
DB = "keep_db"
# An ActiveRecord session store's table, with an app trigger that must not run when the rows are carried.
APP_SCHEMA = """
CREATE TABLE sessions (id bigserial PRIMARY KEY, session_id varchar NOT NULL UNIQUE, data text,
                       updated_at timestamp(6) without time zone NOT NULL DEFAULT now());
CREATE TABLE app_audit (what text);
CREATE FUNCTION app_audit_session() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO app_audit VALUES ('touched ' || NEW.session_id); RETURN NEW; END $$;
CREATE TRIGGER sessions_audit BEFORE INSERT ON sessions FOR EACH ROW EXECUTE FUNCTION app_audit_session();
"""


def sessions(pg: PgServer) -> list[tuple]:
    return pg.sql("SELECT id, session_id, data FROM sessions ORDER BY id", dbname=DB)


def request(src: Path, **kw) -> RestoreRequest:
    return RestoreRequest(db=DB, src=str(src), bindir=str(client_bindir()), keep_previous=0, **kw)


@pytest.fixture
def app_db(pg: PgServer, dumps, tmp_path: Path):
    """keep_db: chinook plus a sessions table with two signed-in users, dumped; then the app goes on."""
    pg.sql(f"CREATE DATABASE {DB} TEMPLATE chinook_source")
    with pg.connect(DB) as conn:
        conn.execute(APP_SCHEMA)
        conn.execute("INSERT INTO sessions (session_id, data) VALUES ('s-old-1', 'a'), ('s-old-2', 'b')")
    dump = make_dump(pg, DB, "custom", tmp_path / "keep_db.dump")
    make_dump(pg, DB, "plain", tmp_path / "keep_db.sql")
    yield dump
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{DB}%",)):
        drop_database(pg, name)


def test_sessions_written_after_the_dump_survive_the_restore(pg: PgServer, app_db: Path):
    with pg.connect(DB) as conn:  # after the dump: users sign in and out, the app changes its data
        conn.execute("INSERT INTO sessions (session_id, data) VALUES ('s-new-3', 'c'), ('s-new-4', 'd')")
        conn.execute("DELETE FROM sessions WHERE session_id = 's-old-1'")
        conn.execute("UPDATE sessions SET data = 'b2' WHERE session_id = 's-old-2'")
        conn.execute("DELETE FROM invoice_line")
        conn.execute("TRUNCATE app_audit")
    live_sessions = sessions(pg)

    res = restore_database(pg.params(), request(app_db, keep_tables=("sessions",)))
    assert res.changed and any(s.startswith("check public.sessions in ") for s in res.steps_done), res.steps_done
    assert sessions(pg) == live_sessions  # signed-in users stay signed in
    assert res.kept_tables["rows"] == {"public.sessions": 3} and res.kept_tables["ms"] <= res.switch_window_ms
    # the rest is the dump's
    counts = "SELECT (SELECT count(*) FROM invoice_line), (SELECT count(*) FROM track)"
    assert pg.sql(counts, dbname=DB) == pg.sql(counts, dbname="chinook_source")
    # the app's trigger did not run for the carried rows (replica role); the dump's audit table is back
    assert pg.sql("SELECT what FROM app_audit ORDER BY 1", dbname=DB) == [("touched s-old-1",), ("touched s-old-2",)]
    # the id sequence goes on from the live one: the next sign-in gets a new id
    new_id = pg.sql("INSERT INTO sessions (session_id) VALUES ('s-next') RETURNING id", dbname=DB)[0][0]
    assert new_id > max(row[0] for row in live_sessions)


def test_a_table_that_differs_from_the_dump_is_refused_before_staging(pg: PgServer, app_db: Path):
    pg.sql("ALTER TABLE sessions ADD COLUMN user_id bigint", dbname=DB)  # a migration after the dump
    before = fingerprint_db(pg, DB)
    plain = app_db.with_name("keep_db.sql")
    for src, check_mode in ((app_db, True), (app_db, False), (plain, True), (plain, False)):
        with pytest.raises(PgOpsError, match=r"public.sessions differs between the live database and the dump") as exc:
            restore_database(pg.params(), request(src, keep_tables=("sessions",)), check_mode=check_mode)
        assert exc.value.details.get("created") == [], exc.value.details  # nothing staged
    assert fingerprint_db(pg, DB) == before
    # a table missing on one side, and a trigger that fires even for replicas (app code run as superuser)
    pg.sql("ALTER TABLE sessions DROP COLUMN user_id", dbname=DB)
    pg.sql("ALTER TABLE sessions ENABLE ALWAYS TRIGGER sessions_audit", dbname=DB)
    with pytest.raises(PgOpsError) as exc:
        restore_database(pg.params(), request(app_db, keep_tables=("sessions", "app.users")), check_mode=True)
    assert "the live database has no table app.users" in str(exc.value)
    assert "trigger sessions_audit fires even with session_replication_role=replica" in str(exc.value)
    with pytest.raises(PgOpsError, match="strategy=swap only"):
        request(app_db, keep_tables=("sessions",), strategy="replace")
    assert fingerprint_db(pg, DB) == before


def test_keep_tables_with_a_source_database_is_checked_before_staging(pg: PgServer, app_db: Path):
    """A streamed restore (source): the preflight, check mode too, compares the live tables with the source's."""
    source = f"{DB}_source"
    pg.sql(f"CREATE DATABASE {source} TEMPLATE {DB}")  # the app's schema, as the source server has it
    src = {"db": source, "host": "127.0.0.1", "port": pg.port, "user": SUPERUSER, "password": SUPERUSER_PASSWORD,
           "ssl_mode": "disable"}  # fmt: skip
    pg.sql("ALTER TABLE sessions DISABLE TRIGGER sessions_audit", dbname=source)
    pg.sql("ALTER TABLE sessions DISABLE TRIGGER sessions_audit", dbname=DB)
    req = RestoreRequest(db=DB, source=src, bindir=str(client_bindir()), keep_previous=0, keep_tables=("sessions",))
    res = restore_database(pg.params(), req, check_mode=True)  # alike: check mode finds nothing
    assert res.changed

    pg.sql("ALTER TABLE sessions ADD COLUMN user_id bigint", dbname=DB)  # a migration the source has not had
    pg.sql("ALTER TABLE sessions ENABLE ALWAYS TRIGGER sessions_audit", dbname=source)
    before = fingerprint_db(pg, DB)
    for check_mode in (True, False):
        with pytest.raises(PgOpsError) as exc:
            restore_database(pg.params(), req, check_mode=check_mode)
        assert "public.sessions differs between the live database and the source database" in str(exc.value)
        assert "the source lacks column user_id (bigint)" in str(exc.value)
        assert "public.sessions in the source database: trigger sessions_audit fires even" in str(exc.value)
        assert exc.value.details.get("created") == [], exc.value.details  # refused before staging
    assert fingerprint_db(pg, DB) == before
    pg.sql("DROP TABLE sessions", dbname=source)
    with pytest.raises(PgOpsError, match=r"the source database has no table public\.sessions"):
        restore_database(pg.params(), req, check_mode=True)
    drop_database(pg, source)
