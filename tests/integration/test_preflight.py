"""What would fail after staging a full copy is found first, in check mode too, with nothing created."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils import preflight
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from tests.conftest import drop_database
from tests.harness.pg import PgServer, client_bindir, start_server
from tests.integration.conftest import records_kept_by

pytestmark = pytest.mark.edge_majors
DEBIAN_15_BIN = Path("/usr/lib/postgresql/15/bin")


def restore(pg: PgServer, db: str, src: Path, check_mode: bool, params=None, **kw):
    req = RestoreRequest(db=db, src=str(src), **{"bindir": str(client_bindir()), **kw})
    return restore_database(params or pg.params(), req, check_mode=check_mode)


@pytest.fixture
def role(pg: PgServer):
    """A login role of our own (not a superuser), dropped afterwards."""
    made: list[str] = []

    def make(name: str, *options: str) -> dict:
        pg.sql(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw' " + " ".join(options)).format(sql.Identifier(name)))
        made.append(name)
        return {"login_user": name, "login_password": "pw"}

    yield make
    dbs = [r[0] for r in pg.sql("SELECT datname FROM pg_database WHERE datallowconn")]
    for name in made:
        for db in dbs:  # what it owns in any database, the restored copies included
            pg.sql(sql.SQL("REASSIGN OWNED BY {} TO postgres").format(sql.Identifier(name)), dbname=db)
        pg.sql(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
        pg.sql(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.mark.parametrize("check_mode", [True, False], ids=["check", "run"])
def test_truncated_dump_fails_before_staging(pg: PgServer, dumps, live_db: str, tmp_path: Path, check_mode: bool):
    data = dumps["chinook"]["custom"].read_bytes()
    cut = tmp_path / "cut.dump"
    cut.write_bytes(data[: len(data) * 2 // 3])
    before, started = pg.databases(), time.monotonic()
    with pytest.raises(PgOpsError, match="is not readable") as err:
        restore(pg, live_db, cut, check_mode, strategy="replace" if not check_mode else "swap")
    assert pg.databases() == before and time.monotonic() - started < 20
    assert not err.value.details["changed"] and err.value.details["steps_done"] == []


@pytest.mark.parametrize("check_mode", [True, False], ids=["check", "run"])
def test_role_without_createdb_is_told_before_staging(pg: PgServer, dumps, live_db: str, role, check_mode: bool):
    login = role("no_createdb")
    pg.sql(sql.SQL("ALTER DATABASE {} OWNER TO no_createdb").format(sql.Identifier(live_db)))
    before = pg.databases()
    with pytest.raises(PgOpsError, match=r'may not create databases: ALTER ROLE "no_createdb" CREATEDB'):
        restore(pg, live_db, dumps["chinook"]["custom"], check_mode, params=pg.params(**login),
                tool_args=("--no-owner", "--no-privileges"))  # fmt: skip
    assert pg.databases() == before


@pytest.mark.parametrize("check_mode", [True, False], ids=["check", "run"])
def test_owner_without_pg_signal_backend_is_told_before_staging(pg: PgServer, dumps, live_db: str, role,
                                                                check_mode: bool):  # fmt: skip
    login = role("db_owner", "CREATEDB")
    role("other_app")
    pg.sql(sql.SQL("ALTER DATABASE {} OWNER TO db_owner").format(sql.Identifier(live_db)))
    pg.sql(sql.SQL("GRANT CONNECT ON DATABASE {} TO other_app").format(sql.Identifier(live_db)))
    before = pg.databases()
    with pg.connect(live_db, user="other_app", password="pw"):
        with pytest.raises(PgOpsError, match=r"may not end the sessions of other_app .*GRANT pg_signal_backend"):
            restore(pg, live_db, dumps["chinook"]["custom"], check_mode, params=pg.params(**login),
                    tool_args=("--no-owner", "--no-privileges"))  # fmt: skip
    assert pg.databases() == before


def test_dump_owners_that_cannot_be_set_are_named(pg: PgServer, dumps, live_db: str, role):
    login = role("plain_owner", "CREATEDB")
    pg.sql(sql.SQL("ALTER DATABASE {} OWNER TO plain_owner").format(sql.Identifier(live_db)))
    records_kept_by(pg, "plain_owner")
    with pytest.raises(PgOpsError, match=r"may not SET ROLE to postgres.*--no-owner --no-privileges"):
        restore(pg, live_db, dumps["chinook"]["custom"], True, params=pg.params(**login))
    res = restore(pg, live_db, dumps["chinook"]["custom"], False, params=pg.params(**login),
                  tool_args=("--no-owner", "--no-privileges"))  # fmt: skip
    assert res.changed


def test_several_problems_are_reported_together(pg: PgServer, dumps, live_db: str, role):
    login = role("nobody_much")
    pg.sql("DROP SCHEMA IF EXISTS pgops_dbrestore CASCADE")  # none yet: the role would have to make it
    with pytest.raises(PgOpsError) as err:
        restore(pg, live_db, dumps["chinook"]["custom"], True, params=pg.params(**login))
    problems = err.value.details["problems"]
    assert any("CREATEDB" in p for p in problems) and any("does not own" in p for p in problems)
    assert any("SET ROLE" in p for p in problems), problems
    assert any("GRANT CREATE ON DATABASE" in p for p in problems), problems


def test_too_old_pg_restore_names_the_client_to_use(pg: PgServer, dumps, live_db: str):
    if not (DEBIAN_15_BIN / "pg_restore").exists():
        pytest.skip("needs the Debian postgresql-client-15 package as an older client")
    with pytest.raises(PgOpsError, match=r"too old for this dump \(archive format 1\.16, which pg_restore 17 and"):
        restore(pg, live_db, dumps["chinook"]["custom"], True, bindir=str(DEBIAN_15_BIN))


def test_newer_installed_client_is_picked_when_path_has_an_old_one(
    pg: PgServer, dumps, live_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    if not (DEBIAN_15_BIN / "pg_restore").exists():
        pytest.skip("needs the Debian postgresql-client-15 package as an older client")
    installed = tmp_path / "lib" / "postgresql" / "18"
    installed.mkdir(parents=True)
    (installed / "bin").symlink_to(client_bindir())
    monkeypatch.setattr(preflight, "CLIENT_BINDIRS", (str(tmp_path / "lib" / "postgresql" / "*" / "bin"),))
    monkeypatch.setenv("PATH", f"{DEBIAN_15_BIN}{os.pathsep}{os.environ['PATH']}")
    req = RestoreRequest(db=live_db, src=str(dumps["chinook"]["custom"]))
    res = restore_database(pg.params(), req)
    assert res.changed and any(f"using the client tools in {installed / 'bin'}" in line for line in res.log)


@pytest.mark.newest_major
def test_prepared_transactions_and_slots_block_before_staging(pg: PgServer, dumps):
    server = start_server(pg.major, max_prepared_transactions="2", wal_level="logical")
    try:
        server.sql("CREATE DATABASE shop")
        # the slot first: making one waits for every open transaction, prepared ones included
        server.sql("SELECT pg_create_logical_replication_slot('cdc', 'test_decoding')", dbname="shop")
        with server.connect("shop") as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.autocommit = False
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("PREPARE TRANSACTION 'pending-payment'")
        with pytest.raises(PgOpsError) as err:
            restore(server, "shop", dumps["chinook"]["custom"], True)
        problems = " ".join(err.value.details["problems"])
        assert "prepared transactions pending-payment" in problems and "ROLLBACK PREPARED" in problems
        assert "logical replication slots cdc" in problems
        assert "shop_pgops_staging" not in server.databases()
    finally:
        server.sql("ROLLBACK PREPARED 'pending-payment'", dbname="shop")
        server.destroy()


def test_conflicting_options_are_refused(pg: PgServer, dumps):
    with pytest.raises(PgOpsError, match="leave src out"):
        RestoreRequest(db="x", src=str(dumps["chinook"]["custom"]), rollback=True)
    with pytest.raises(PgOpsError, match="leave strategy out"):
        RestoreRequest(db="x", rollback=True, strategy="replace")
    with pytest.raises(PgOpsError, match=r"is the maintenance database \(login_db\)"):
        restore(pg, "postgres", dumps["chinook"]["custom"], True)
    drop_database(pg, "x")
