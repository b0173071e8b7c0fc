"""The least trusted parties gain nothing through a restore: each test plants the attack, then the operator runs.

The application's role owns its database (not a superuser); whoever writes the backup directory
controls the dump. Real servers; the app role acts through its own connections.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import LOCK_NOT_AVAILABLE, PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.registry import LOCK_CLASS
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import ClearRequest, clear_sessions
from tests.conftest import drop_database
from tests.harness.dumps import make_dump
from tests.harness.pg import PgServer, client_bindir
from tests.harness.restore_process import paused_restore

pytestmark = pytest.mark.edge_majors

APP, APP_PASSWORD = "shop_app", "shop-app-secret"
DB = "shop"

# Runs harmlessly as the app; as a superuser it makes the app one. The trap of every attack below.
TRAP = """
CREATE FUNCTION public.escalate() RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
  BEGIN
    EXECUTE 'RESET ROLE';
    EXECUTE 'SET SESSION AUTHORIZATION DEFAULT';
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
  IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
    EXECUTE 'ALTER ROLE shop_app SUPERUSER';
  END IF;
  RETURN true;
END $f$;
CREATE FUNCTION public.to_regclass(text) RETURNS regclass LANGUAGE sql AS
  'SELECT CASE WHEN public.escalate() THEN NULL::regclass END';
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql AS
  'SELECT CASE WHEN public.escalate() THEN pg_catalog.now() END';
CREATE FUNCTION public.current_setting(text) RETURNS text LANGUAGE sql AS
  'SELECT CASE WHEN public.escalate() THEN pg_catalog.current_setting($1) END';
CREATE VIEW public.healthy AS SELECT public.escalate() AS ok;
CREATE TABLE public.orders (id int PRIMARY KEY, note text);
INSERT INTO public.orders SELECT g, 'order ' || g FROM generate_series(1, 50) g;
"""


def app_sql(pg: PgServer, query, params=None, dbname: str = DB):
    with pg.connect(dbname, user=APP, password=APP_PASSWORD) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def app_is_superuser(pg: PgServer) -> bool:
    return pg.sql("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (APP,))[0][0]


def acl(pg: PgServer, db: str = DB) -> str | None:
    return pg.sql("SELECT datacl::text FROM pg_database WHERE datname = %s", (db,))[0][0]


def restore(pg: PgServer, src: Path | None = None, check_mode: bool = False, **kw):
    req = RestoreRequest(db=DB, src=str(src) if src else None, bindir=str(client_bindir()), **kw)
    return restore_database(pg.params(), req, check_mode=check_mode)


@pytest.fixture
def shop(pg: PgServer, tmp_path: Path):
    """The app's own database, trapped by the app role, and a dump of it (taken by the app's tooling)."""
    pg.sql(sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(sql.Identifier(APP), sql.Literal(APP_PASSWORD)))
    pg.sql(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DB), sql.Identifier(APP)))
    app_sql(pg, TRAP)
    app_sql(pg, sql.SQL("ALTER DATABASE {} SET search_path = public, pg_catalog").format(sql.Identifier(DB)))
    dump = make_dump(pg, DB, "custom", tmp_path / "shop.dump")
    yield dump
    for name in pg.databases():
        if name.startswith(DB):
            drop_database(pg, name)
    pg.sql(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(APP)))
    pg.sql(sql.SQL("DROP ROLE {}").format(sql.Identifier(APP)))


def test_search_path_and_verify_query_traps_give_the_app_nothing(pg: PgServer, shop: Path):
    """Attacks 1 and 2: shadowed catalog functions with the database's search_path, and a view calling them."""
    restore(pg, shop, check_mode=True, verify_query="SELECT ok FROM healthy")
    assert not app_is_superuser(pg)
    res = restore(pg, shop, force=True, verify_query="SELECT ok FROM healthy")
    assert res.changed and res.previous_db
    restore(pg, shop, check_mode=True)  # the restored copy carries the trap and the setting: run again
    restore(pg, rollback=True)
    assert not app_is_superuser(pg)
    assert app_sql(pg, "SELECT count(*) FROM orders") == [(50,)]  # the app's data came through


def test_verify_query_runs_as_the_owner_not_the_login_role(pg: PgServer, shop: Path):
    with pytest.raises(PgOpsError, match="verify_query failed on the restored copy: permission denied"):
        restore(pg, shop, force=True, verify_query="SELECT count(*) > 0 FROM pg_authid")
    assert DB in pg.databases() and f"{DB}_pgops_staging" not in pg.databases()


@pytest.mark.parametrize(
    "payload",
    ["\\! touch {marker}\n", "SELECT 1; \\! touch {marker}\n", "\\o {marker}\nSELECT 1;\n"],
    ids=["own-line", "after-sql", "output-redirect"],
)
def test_plain_dump_meta_commands_never_run(pg: PgServer, shop: Path, tmp_path: Path, payload: str):
    """Attack 3: a psql meta-command in a plain dump (\\! runs a shell command as the module's OS user)."""
    marker = tmp_path / "pwned"
    plain = make_dump(pg, DB, "plain", tmp_path / "shop.sql").read_text()
    evil = tmp_path / "evil.sql"
    evil.write_text(plain + payload.format(marker=marker))
    before = app_sql(pg, "SELECT count(*) FROM orders")
    with pytest.raises(PgOpsError, match=r"meta-command|restricted|psql exited"):
        restore(pg, evil)
    assert not marker.exists()
    assert app_sql(pg, "SELECT count(*) FROM orders") == before and f"{DB}_pgops_staging" not in pg.databases()


def test_dump_swapped_after_it_was_opened_is_not_what_loads(pg: PgServer, shop: Path, tmp_path: Path):
    """Attack 3: the dump is opened once; replacing the file between hash and load changes nothing."""
    src = tmp_path / "nightly.dump"
    src.write_bytes(shop.read_bytes())
    app_sql(pg, "INSERT INTO orders VALUES (999, 'planted')")
    planted = make_dump(pg, DB, "custom", tmp_path / "planted.dump")
    app_sql(pg, "DELETE FROM orders WHERE id = 999")
    proc = paused_restore(pg, {"db": DB, "src": str(src), "force": True}, "stage", tmp_path)
    os.replace(planted, src)  # the writer of the backup directory swaps the file now
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert app_sql(pg, "SELECT count(*) FROM orders WHERE id = 999") == [(0,)]


def test_forged_marker_in_the_app_database_is_ignored(pg: PgServer, shop: Path):
    """Attack 4: the owner forges the old in-database marker; our records are out of its reach."""
    first = restore(pg, shop, force=True)
    app_sql(pg, "CREATE SCHEMA pgops_dbrestore; CREATE TABLE pgops_dbrestore.restore_marker (sha256 text)")
    app_sql(pg, "INSERT INTO pgops_dbrestore.restore_marker VALUES (%s)", (first.sha256,))
    app_sql(pg, "DELETE FROM orders")
    wait_until_no_session(pg, DB)  # the app's backend has reported its row counts as it exited
    with pytest.raises(Exception, match="permission denied"):
        app_sql(pg, "INSERT INTO pgops_dbrestore.restored (datoid, datname, sha256, format, size, src) "
                    "SELECT oid, datname, 'x', 'custom', 1, 'x' FROM pg_database", dbname="postgres")  # fmt: skip
    again = restore(pg, shop)
    assert not again.changed and "nothing to do" in again.log[-1]  # our own record: same dump
    if pg.major >= 15:  # older servers' statistics arrive too late to tell
        written = re.search(r"written since \((\d+) row changes\): force=true", again.log[-1])
        assert written and int(written.group(1)) >= 50, again.log[-1]  # the deletes, and the forged table
    assert restore(pg, shop, force=True).changed
    assert app_sql(pg, "SELECT count(*) FROM orders") == [(50,)]


def test_records_schema_made_by_the_app_is_neither_read_nor_written(pg: PgServer, shop: Path):
    """Attack 4: a role that may create schemas in the maintenance database makes ours first and forges records."""
    pg.sql("DROP SCHEMA IF EXISTS pgops_dbrestore CASCADE")
    pg.sql(sql.SQL("GRANT CREATE ON DATABASE postgres TO {}").format(sql.Identifier(APP)))
    try:
        app_sql(pg, "CREATE SCHEMA pgops_dbrestore", dbname="postgres")
        with pytest.raises(PgOpsError, match=f"objects there belong to {APP}, neither the login role nor a superuser"):
            restore(pg, shop, check_mode=True)
    finally:
        pg.sql("DROP SCHEMA IF EXISTS pgops_dbrestore CASCADE")
        pg.sql(sql.SQL("REVOKE CREATE ON DATABASE postgres FROM {}").format(sql.Identifier(APP)))


def test_revoke_connect_gives_back_exactly_the_acl_it_found(pg: PgServer, shop: Path):
    """Attack 5: reopening after revoke_connect must not GRANT CONNECT TO PUBLIC where there was none."""
    pg.sql(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(DB)))
    pg.sql(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(DB), sql.Identifier(APP)))
    before = acl(pg)
    clear_sessions(pg.params(), ClearRequest(db=DB, block="revoke_connect"))
    assert acl(pg) == before
    clear_sessions(pg.params(), ClearRequest(db=DB, state="blocked", block="revoke_connect"))
    with pytest.raises(Exception, match="permission denied"):
        app_sql(pg, "SELECT 1")
    clear_sessions(pg.params(), ClearRequest(db=DB, state="allowed", block="revoke_connect"))
    assert acl(pg) == before
    restore(pg, shop, force=True, block_new_connections="revoke_connect")
    assert acl(pg) == before
    restore(pg, rollback=True, block_new_connections="revoke_connect")
    assert acl(pg) == before and app_sql(pg, "SELECT 1") == [(1,)]


def test_planted_previous_copy_is_neither_dropped_nor_rolled_in(pg: PgServer, shop: Path):
    """Attack 6: a role with CREATEDB names a database like our newest previous copy."""
    first = restore(pg, shop, force=True)
    planted = f"{DB}_prev_29991231T235959999Z"
    app_sql(pg, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(planted)), dbname="postgres")
    app_sql(pg, "CREATE TABLE attacker (x int)", dbname=planted)
    second = restore(pg, shop, force=True)  # keep_previous=1 drops the older real copy, not the planted one
    assert planted in pg.databases() and first.previous_db in second.dropping
    restore(pg, rollback=True)
    assert app_sql(pg, "SELECT to_regclass('public.attacker') IS NULL") == [(True,)]
    assert planted in pg.databases()


def test_planted_staging_database_is_refused_not_used(pg: PgServer, shop: Path):
    app_sql(pg, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(f"{DB}_pgops_staging")), dbname="postgres")
    with pytest.raises(PgOpsError, match=r"pgops\.dbrestore did not make"):
        restore(pg, shop, force=True)
    assert f"{DB}_pgops_staging" in pg.databases()


def test_unprivileged_lock_holder_does_not_block_a_restore(pg: PgServer, shop: Path):
    """Attack 7: the app role takes the restore's lock key and holds it forever."""
    with pg.connect("postgres", user=APP, password=APP_PASSWORD) as squatter:
        squatter.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, DB))
        res = restore(pg, shop, force=True, lock_timeout=5)
        assert res.changed and any("holding the restore lock" in w for w in res.warnings)


def test_runs_through_two_maintenance_databases_exclude_each_other(pg: PgServer, shop: Path):
    pg.sql("CREATE DATABASE maint_two")
    try:
        with pg.connect("maint_two") as other_run:  # a superuser's run through another login_db
            other_run.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, DB))
            with pytest.raises(PgOpsError, match="another restore of database") as err:
                restore(pg, shop, force=True)
            assert err.value.sqlstate == LOCK_NOT_AVAILABLE and not err.value.details["changed"]
    finally:
        drop_database(pg, "maint_two")


def test_carried_over_settings_are_masked_in_the_result(pg: PgServer, shop: Path):
    """Attack 8: ALTER DATABASE … SET values may hold secrets; they carry over but are never printed."""
    pg.sql(sql.SQL("ALTER DATABASE {} SET app.api_key = 'sk-live-0123456789'").format(sql.Identifier(DB)))
    res = restore(pg, shop, force=True)
    assert "sk-live-0123456789" not in repr(res.as_dict())
    with pg.connect(DB) as conn:
        assert conn.execute("SELECT current_setting('app.api_key')").fetchone()[0] == "sk-live-0123456789"


def test_killed_rollback_reopens_the_database(pg: PgServer, shop: Path, tmp_path: Path):
    """Attack 9: a rollback killed after its renames, before it reopened the copy it swapped back."""
    restore(pg, shop, force=True)
    proc = paused_restore(pg, {"db": DB, "rollback": True}, "rolled-back", tmp_path)
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while not pg.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (DB,))[0][0]:
        assert time.monotonic() < deadline, "the rolled-back copy stayed closed"
        time.sleep(0.05)
    assert app_sql(pg, "SELECT count(*) FROM orders") == [(50,)]


def wait_until_no_session(pg: PgServer, db: str) -> None:
    deadline = time.monotonic() + 30
    while pg.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (db,))[0][0]:
        assert time.monotonic() < deadline, f"sessions stay on {db}"
        time.sleep(0.02)
