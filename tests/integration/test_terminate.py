"""pg_terminate_connections logic against real servers of every selected major."""

from __future__ import annotations

import time

import psycopg
import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import (
    ClearRequest,
    RestartSpec,
    SessionFilter,
    block_status,
    clear_sessions,
)
from tests.conftest import drop_database
from tests.harness.pg import SUPERUSER, SUPERUSER_PASSWORD, PgServer
from tests.harness.storm import Storm

STORM_CLIENTS = 60
TRIALS = 5


def storm_for(
    pg: PgServer, db: str, clients: int = STORM_CLIENTS, user: str = SUPERUSER, password: str = SUPERUSER_PASSWORD
):
    return Storm(dict(host="127.0.0.1", port=pg.port, dbname=db, user=user, password=password), clients=clients)


def sessions_on(pg: PgServer, db: str) -> int:
    return pg.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (db,))[0][0]


def ident(name: str) -> sql.Composable:
    return sql.Identifier(name)


@pytest.fixture
def roles(pg: PgServer):
    """An app role (the sessions), a signaler (pg_signal_backend) and a plain owner without it."""
    made = []

    def make(name: str, *grants: str) -> str:
        pg.sql(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(ident(name)))
        for g in grants:
            pg.sql(sql.SQL("GRANT {} TO {}").format(ident(g), ident(name)))
        made.append(name)
        return name

    yield make
    for name in reversed(made):
        pg.sql(sql.SQL("REASSIGN OWNED BY {} TO {}").format(ident(name), ident(SUPERUSER)))
        pg.sql(sql.SQL("DROP OWNED BY {}").format(ident(name)))
        pg.sql(sql.SQL("DROP ROLE {}").format(ident(name)))


def test_storm_block_then_drop_every_time(pg: PgServer, dbname: str):
    """60 clients reconnecting as fast as they can: block + terminate, then DROP DATABASE wins, 5 of 5."""
    create = sql.SQL("CREATE DATABASE {}").format(ident(dbname))
    drop = sql.SQL("DROP DATABASE {}").format(ident(dbname))
    for trial in range(TRIALS):
        with storm_for(pg, dbname) as storm:
            storm.wait_connected()
            res = clear_sessions(pg.params(), ClearRequest(db=dbname, state="blocked", block="allow_connections"))
            assert res.changed and res.blocked
            assert res.count >= STORM_CLIENTS, f"trial {trial}: ended {res.count}"
            assert res.method == "pg_terminate_backend"
            pg.sql(drop)  # fails with "being accessed by other users" if anyone got back in
            pg.sql(create)


def test_blocked_until_allowed(pg: PgServer, dbname: str):
    with storm_for(pg, dbname, clients=20) as storm:
        storm.wait_connected()
        res = clear_sessions(pg.params(), ClearRequest(db=dbname, state="blocked", block="allow_connections"))
        assert res.count == 20 and res.blocked
        before = storm.total_connects
        time.sleep(0.5)
        assert storm.total_connects == before, "a client got in while the database was blocked"
        assert sessions_on(pg, dbname) == 0

        reopened = clear_sessions(pg.params(), ClearRequest(db=dbname, state="allowed"))
        assert reopened.changed and not reopened.blocked
        deadline = time.monotonic() + 10
        while storm.total_connects < before + 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert storm.total_connects >= before + 20, "clients could not connect again after state=allowed"
    again = clear_sessions(pg.params(), ClearRequest(db=dbname, state="allowed"))
    assert not again.changed


def test_terminated_state_lifts_its_own_block(pg: PgServer, dbname: str):
    with storm_for(pg, dbname, clients=10) as storm:
        storm.wait_connected()
        res = clear_sessions(pg.params(), ClearRequest(db=dbname, block="allow_connections"))
        assert res.count >= 10 and not res.blocked
        assert block_status(pg.connect(), dbname, ())["allow_connections"]
        assert set(res.elapsed_ms) >= {"connect", "block", "terminate", "unblock", "total"}


def test_check_mode_changes_nothing_and_counts_exactly(pg: PgServer, dbname: str):
    with storm_for(pg, dbname, clients=7) as storm:
        storm.wait_connected()
        res = clear_sessions(
            pg.params(), ClearRequest(db=dbname, state="blocked", block="allow_connections"), check_mode=True
        )
        assert res.count == 7 and res.changed
        assert res.diff == {"before": {"blocked": False, "sessions": 7}, "after": {"blocked": True, "sessions": 0}}
        time.sleep(0.2)
        assert storm.total_broken == 0 and sessions_on(pg, dbname) == 7
        assert block_status(pg.connect(), dbname, ())["allow_connections"]


def test_no_sessions_is_not_a_change(pg: PgServer, dbname: str):
    res = clear_sessions(pg.params(), ClearRequest(db=dbname))
    assert not res.changed and res.count == 0 and res.method == "none"


def test_filters_spare_other_sessions(pg: PgServer, dbname: str, roles):
    app = roles("pgops_app")
    pg.sql(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(ident(dbname), ident(app)))
    with storm_for(pg, dbname, clients=3, user=app, password="pw") as apps, storm_for(pg, dbname, clients=2) as admins:
        apps.wait_connected()
        admins.wait_connected()
        res = clear_sessions(
            pg.params(),
            ClearRequest(
                db=dbname,
                block="revoke_connect",
                block_roles=(app,),
                session_filter=SessionFilter(
                    users=(app,), application_names=("storm-*",), client_addrs=("127.0.0.0/8",)
                ),
            ),
        )
        assert {s["user"] for s in res.terminated} == {app}
        assert admins.total_broken == 0, "sessions outside the filter were ended"


def test_signal_backend_member_succeeds(pg: PgServer, dbname: str, roles):
    app = roles("pgops_app2")
    signaler = roles("pgops_signaler", "pg_signal_backend")
    pg.sql(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident(dbname), ident(signaler)))
    with storm_for(pg, dbname, clients=10, user=app, password="pw") as storm:
        storm.wait_connected()
        res = clear_sessions(
            pg.params(login_user=signaler, login_password="pw"),
            ClearRequest(db=dbname, state="blocked", block="allow_connections"),
        )
        assert res.count >= 10 and res.blocked
    pg.sql(sql.SQL("DROP DATABASE {}").format(ident(dbname)))


def test_missing_privilege_is_explained_and_nothing_changes(pg: PgServer, dbname: str, roles):
    app = roles("pgops_app3")
    owner = roles("pgops_owner")
    pg.sql(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident(dbname), ident(owner)))
    with storm_for(pg, dbname, clients=5, user=app, password="pw") as storm:
        storm.wait_connected()
        with pytest.raises(PgOpsError) as err:
            clear_sessions(
                pg.params(login_user=owner, login_password="pw"),
                ClearRequest(db=dbname, state="blocked", block="allow_connections"),
            )
        msg = str(err.value)
        assert "pg_signal_backend" in msg and owner in msg and "fallback=restart" in msg
        assert "\n" not in msg
        assert storm.total_broken == 0 and sessions_on(pg, dbname) == 5
        assert block_status(pg.connect(), dbname, ())["allow_connections"]


def test_restart_fallback_with_pg_ctl(pg: PgServer, dbname: str, roles):
    app = roles("pgops_app4")
    owner = roles("pgops_owner2")
    pg.sql(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident(dbname), ident(owner)))
    spec = RestartSpec(pg_ctl=str(pg.bindir / "pg_ctl"), data_dir=str(pg.datadir), become_user=pg.os_user)
    try:
        with storm_for(pg, dbname, clients=5, user=app, password="pw") as storm:
            storm.wait_connected()
            res = clear_sessions(
                pg.params(login_user=owner, login_password="pw"),
                ClearRequest(db=dbname, state="blocked", block="allow_connections", fallback="restart", restart=spec),
            )
            assert res.restarted and res.method == "restart" and res.blocked
            assert res.count == 5 and "restart" in res.elapsed_ms
            assert "restart" in res.restart_command and str(pg.datadir) in res.restart_command
            assert sessions_on(pg, dbname) == 0
            assert storm.total_broken >= 5
    finally:
        pg.wait_ready()


def test_failure_midway_reopens_what_it_blocked(pg: PgServer, dbname: str):
    """revoke_connect does not stop superusers: the storm outlasts wait_timeout, the call fails, CONNECT is back."""
    with storm_for(pg, dbname, clients=10) as storm:
        storm.wait_connected()
        with pytest.raises(PgOpsError) as err:
            clear_sessions(pg.params(), ClearRequest(db=dbname, block="revoke_connect", wait_timeout=1.0))
        assert "wait_timeout" in str(err.value)
        assert err.value.details["remaining"] and err.value.details["changed"]
    status = block_status(pg.connect(), dbname, ())
    assert status["allow_connections"] and not status["connect_revoked"]


@pytest.mark.parametrize("name", ["select", 'x"; DROP DATABASE postgres; --', "日本語 db", "a'b"])
def test_hostile_names_cannot_inject(pg: PgServer, name: str):
    pg.sql(sql.SQL("CREATE DATABASE {}").format(ident(name)))
    try:
        with storm_for(pg, name, clients=3) as storm:
            storm.wait_connected()
            res = clear_sessions(pg.params(), ClearRequest(db=name, state="blocked", block="allow_connections"))
            assert res.count >= 3
            clear_sessions(pg.params(), ClearRequest(db=name, state="allowed"))
        clear_sessions(pg.params(), ClearRequest(db=name, block="revoke_connect", block_roles=(SUPERUSER,)))
        assert pg.sql("SELECT count(*) FROM pg_database WHERE datname IN ('postgres', %s)", (name,))[0][0] == 2
    finally:
        drop_database(pg, name)


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        ({"login_password": "wrong"}, "password authentication failed"),
        ({"login_port": 1}, "Connection refused"),
        ({"login_user": "nobody_here"}, "nobody_here"),
    ],
)
def test_connection_errors_are_one_clear_line(pg: PgServer, overrides: dict, expect: str):
    with pytest.raises(PgOpsError) as err:
        clear_sessions(pg.params(**overrides), ClearRequest(db="postgres"))
    assert expect in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("cannot connect to PostgreSQL as ")


def test_missing_database(pg: PgServer):
    with pytest.raises(PgOpsError, match='database "no such db" does not exist'):
        clear_sessions(pg.params(), ClearRequest(db="no such db", state="blocked", block="allow_connections"))
    with pytest.raises(psycopg.OperationalError):
        pg.connect("no such db")
