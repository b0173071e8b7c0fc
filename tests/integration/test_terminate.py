"""pg_terminate_connections logic against real servers of every selected major."""

from __future__ import annotations

import time

import psycopg
import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import AllowConnections, RevokeConnect
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.registry import Registry
from ansible_collections.pgops.dbrestore.plugins.module_utils.restart import RestartSpec
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import (
    ClearRequest,
    SessionFilter,
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


def allows_connections(pg: PgServer, db: str) -> bool:
    return pg.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (db,))[0][0]


def datacl(pg: PgServer, db: str) -> str | None:
    """The database's ACL exactly as the catalog stores it (NULL: never granted nor revoked)."""
    return pg.sql("SELECT datacl::text FROM pg_database WHERE datname = %s", (db,))[0][0]


def can_connect(pg: PgServer, db: str, user: str, password: str = "pw") -> bool:
    try:
        with pg.connect(db, user=user, password=password) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError as exc:
        assert "permission denied" in str(exc) or "not currently accepting connections" in str(exc), exc
        return False


def ident(name: str) -> sql.Composable:
    return sql.Identifier(name)


@pytest.fixture
def roles(pg: PgServer):
    """Roles made by a test, dropped afterwards with whatever they own."""
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
            assert res.terminated_count >= STORM_CLIENTS, f"trial {trial}: ended {res.terminated_count}"
            assert res.terminated_count == len({s["pid"] for s in res.terminated})
            assert res.method == "pg_terminate_backend"
            pg.sql(drop)  # fails with "being accessed by other users" if anyone got back in
            pg.sql(create)


def test_blocked_until_allowed(pg: PgServer, dbname: str):
    with storm_for(pg, dbname, clients=20) as storm:
        storm.wait_connected()
        res = clear_sessions(pg.params(), ClearRequest(db=dbname, state="blocked", block="allow_connections"))
        assert res.terminated_count == 20 and res.blocked and not allows_connections(pg, dbname)
        # state, not time: every client is disconnected and keeps failing against the closed database
        since = storm.connects_now()
        failed = sum(s.failed_connects for s in storm.stats)
        deadline = time.monotonic() + 10
        while sum(s.failed_connects for s in storm.stats) < failed + 100:
            assert time.monotonic() < deadline, "the clients stopped trying"
            time.sleep(0.01)
        assert storm.connects_now() == since, "a client got in while the database was blocked"
        assert sessions_on(pg, dbname) == 0
        storm.wait_refused("is not currently accepting connections")

        reopened = clear_sessions(pg.params(), ClearRequest(db=dbname, state="allowed"))
        assert reopened.changed and not reopened.blocked and allows_connections(pg, dbname)
        storm.wait_reconnected(since, timeout=10)
    again = clear_sessions(pg.params(), ClearRequest(db=dbname, state="allowed"))
    assert not again.changed


def test_terminated_state_lifts_its_own_block(pg: PgServer, dbname: str):
    with storm_for(pg, dbname, clients=10) as storm:
        storm.wait_connected()
        since = storm.connects_now()
        res = clear_sessions(pg.params(), ClearRequest(db=dbname, block="allow_connections"))
        assert res.terminated_count >= 10 and not res.blocked
        assert allows_connections(pg, dbname)
        assert set(res.elapsed_ms) >= {"connect", "block", "terminate", "unblock", "total"}
        assert res.log[0] == f'closed "{dbname}" to new connections (allow_connections)'
        assert res.log[-1] == f'reopened "{dbname}" to new connections'
        storm.wait_reconnected(since, timeout=10)


def test_check_mode_changes_nothing_and_counts_exactly(pg: PgServer, dbname: str):
    with storm_for(pg, dbname, clients=7) as storm:
        storm.wait_connected()
        pids = {r[0] for r in pg.sql("SELECT pid FROM pg_stat_activity WHERE datname = %s", (dbname,))}
        res = clear_sessions(
            pg.params(), ClearRequest(db=dbname, state="blocked", block="allow_connections"), check_mode=True
        )
        assert res.terminated_count == 7 and res.changed and {s["pid"] for s in res.terminated} == pids
        assert res.diff == {"before": {"blocked": False, "sessions": 7}, "after": {"blocked": True, "sessions": 0}}
        after = {r[0] for r in pg.sql("SELECT pid FROM pg_stat_activity WHERE datname = %s", (dbname,))}
        assert after == pids and storm.total_broken == 0  # the very same backends are still there
        assert allows_connections(pg, dbname)


def test_no_sessions_is_not_a_change(pg: PgServer, dbname: str):
    res = clear_sessions(pg.params(), ClearRequest(db=dbname))
    assert not res.changed and res.terminated == [] and res.terminated_count == 0 and res.method == "none"
    assert "count" not in res.as_dict() and res.as_dict()["terminated_count"] == 0


def test_filters_spare_other_sessions(pg: PgServer, dbname: str, roles):
    app = roles("pgops_app")
    pg.sql(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(ident(dbname), ident(app)))
    with storm_for(pg, dbname, clients=3, user=app, password="pw") as apps, storm_for(pg, dbname, clients=2) as admins:
        apps.wait_connected()
        admins.wait_connected()
        admin_pids = {r[0] for r in pg.sql("SELECT pid FROM pg_stat_activity WHERE datname = %s AND usename = %s",
                                           (dbname, SUPERUSER))}  # fmt: skip
        res = clear_sessions(
            pg.params(),
            ClearRequest(
                db=dbname,
                block="revoke_connect",
                session_filter=SessionFilter(
                    users=(app,), application_names=("storm-*",), client_addrs=("127.0.0.0/8",)
                ),
            ),
        )
        assert res.terminated_count >= 3 and {s["user"] for s in res.terminated} == {app}
        assert admins.total_broken == 0, "sessions outside the filter were ended"
        still = {r[0] for r in pg.sql("SELECT pid FROM pg_stat_activity WHERE datname = %s AND usename = %s",
                                      (dbname, SUPERUSER))}  # fmt: skip
        assert admin_pids <= still


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
        assert res.terminated_count >= 10 and res.blocked
    pg.sql(sql.SQL("DROP DATABASE {}").format(ident(dbname)))


def test_missing_privilege_is_explained_and_nothing_changes(pg: PgServer, dbname: str, roles):
    app = roles("pgops_app3")
    owner = roles("pgops_owner")
    pg.sql(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident(dbname), ident(owner)))
    with storm_for(pg, dbname, clients=5, user=app, password="pw") as storm:
        storm.wait_connected()
        with pytest.raises(PgOpsError, match=f'role "{owner}" may not terminate 5 session') as err:
            clear_sessions(
                pg.params(login_user=owner, login_password="pw"),
                ClearRequest(db=dbname, state="blocked", block="allow_connections"),
            )
        msg = str(err.value)
        assert "pg_signal_backend" in msg and "fallback=restart" in msg and "\n" not in msg
        assert storm.total_broken == 0 and sessions_on(pg, dbname) == 5
        assert allows_connections(pg, dbname)
        assert err.value.details["changed"] is False and err.value.details["terminated"] == []


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
            assert res.terminated_count == 5 and "restart" in res.elapsed_ms
            assert "restart" in res.restart_command and str(pg.datadir) in res.restart_command
            assert sessions_on(pg, dbname) == 0 and not allows_connections(pg, dbname)
            assert storm.total_broken >= 5
    finally:
        pg.wait_ready()


def test_failure_midway_reopens_what_it_blocked(pg: PgServer, dbname: str):
    """revoke_connect does not stop superusers: the storm outlasts wait_timeout, the call fails, CONNECT is back."""
    pg.sql(sql.SQL("GRANT CONNECT ON DATABASE {} TO pg_monitor WITH GRANT OPTION").format(ident(dbname)))
    before = datacl(pg, dbname)
    with storm_for(pg, dbname, clients=10) as storm:
        storm.wait_connected()
        with pytest.raises(PgOpsError, match=r"session\(s\) still on .* after wait_timeout=1s") as err:
            clear_sessions(pg.params(), ClearRequest(db=dbname, block="revoke_connect", wait_timeout=1.0))
        assert err.value.details["remaining"] and err.value.details["changed"]
        assert err.value.details["terminated"] and err.value.details["log"]
    assert allows_connections(pg, dbname) and datacl(pg, dbname) == before


@pytest.mark.parametrize("name", ["select", 'x"; DROP DATABASE postgres; --', "日本語 db", "a'b"])
def test_hostile_names_cannot_inject(pg: PgServer, name: str):
    pg.sql(sql.SQL("CREATE DATABASE {}").format(ident(name)))
    try:
        with storm_for(pg, name, clients=3) as storm:
            storm.wait_connected()
            res = clear_sessions(pg.params(), ClearRequest(db=name, state="blocked", block="allow_connections"))
            assert res.terminated_count >= 3 and not allows_connections(pg, name)
            assert clear_sessions(pg.params(), ClearRequest(db=name, state="allowed")).changed
        assert allows_connections(pg, name)
        pg.sql(sql.SQL("GRANT CONNECT ON DATABASE {} TO pg_monitor").format(ident(name)))
        before = datacl(pg, name)
        res = clear_sessions(pg.params(), ClearRequest(db=name, state="blocked", block="revoke_connect"))
        assert res.blocked and res.block_method == "revoke_connect"
        assert "=c/" not in (datacl(pg, name) or "") and "=Tc/" not in (datacl(pg, name) or "")
        assert clear_sessions(pg.params(), ClearRequest(db=name, state="allowed", block="revoke_connect")).changed
        assert datacl(pg, name) == before
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
    with pytest.raises(PgOpsError, match=r"^cannot connect to PostgreSQL as .*" + expect) as err:
        clear_sessions(pg.params(**overrides), ClearRequest(db="postgres"))
    assert "\n" not in str(err.value)


def test_missing_database_fails_and_leaves_nothing(pg: PgServer):
    """A database that does not exist: a clear error for every state, and no database, record or block made."""
    missing = "no such db"
    for req in (
        ClearRequest(db=missing, state="blocked", block="allow_connections"),
        ClearRequest(db=missing, state="blocked", block="revoke_connect"),
        ClearRequest(db=missing, state="allowed"),
        ClearRequest(db=missing),
    ):
        with pytest.raises(PgOpsError, match=f'^database "{missing}" does not exist on postgres@127.0.0.1:'):
            clear_sessions(pg.params(), req)
    assert pg.sql("SELECT count(*) FROM pg_database WHERE datname = %s", (missing,)) == [(0,)]
    blocks = pg.sql("SELECT to_regclass('pgops_dbrestore.blocks') IS NOT NULL")[0][0]
    if blocks:
        assert pg.sql("SELECT count(*) FROM pgops_dbrestore.blocks WHERE datname = %s", (missing,)) == [(0,)]


# --- revoke_connect: CONNECT taken from every grantee, given back exactly ---------------------------


def test_revoke_connect_locks_out_a_non_superuser_and_gives_back_the_exact_acl(pg: PgServer, dbname: str, roles):
    app = roles("pgops_web")
    reader = roles("pgops_ro")
    pg.sql(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident(dbname)))
    # a grantee with CONNECT only comes first: revoking it removes its entry, giving it back must not move it
    pg.sql(sql.SQL("GRANT CONNECT ON DATABASE {} TO {} WITH GRANT OPTION").format(ident(dbname), ident(reader)))
    pg.sql(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(ident(dbname), ident(app)))
    before = datacl(pg, dbname)
    assert can_connect(pg, dbname, app) and can_connect(pg, dbname, reader)
    with storm_for(pg, dbname, clients=6, user=app, password="pw") as storm:
        storm.wait_connected()
        res = clear_sessions(pg.params(), ClearRequest(db=dbname, state="blocked", block="revoke_connect"))
        assert res.blocked and res.terminated_count >= 6 and sessions_on(pg, dbname) == 0
        assert not can_connect(pg, dbname, app) and not can_connect(pg, dbname, reader)
        storm.wait_refused("permission denied for database")
        with pg.connect() as conn:  # what it took is recorded, so that state=allowed gives back exactly that
            oid = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (dbname,)).fetchone()[0]
            taken = Registry(conn).block(oid)
        assert taken is not None and taken.method == "revoke_connect"
        connect = {(g, grantable) for g, priv, grantable in taken.acl if priv == "CONNECT"}
        assert connect == {(app, False), (reader, True), (SUPERUSER, False)}  # the owner holds CONNECT too
        assert datacl(pg, dbname) != before
        since = storm.connects_now()
        res = clear_sessions(pg.params(), ClearRequest(db=dbname, state="allowed", block="revoke_connect"))
        assert res.changed and datacl(pg, dbname) == before
        storm.wait_reconnected(since, timeout=10)
    assert can_connect(pg, dbname, app) and can_connect(pg, dbname, reader)
    with pg.connect() as conn:
        assert Registry(conn).block(oid) is None


def effective_acl(pg: PgServer, db: str) -> list:
    return pg.sql(
        "SELECT a.grantor::regrole::text, a.grantee, a.privilege_type, a.is_grantable FROM pg_database d, "
        "aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a WHERE d.datname = %s ORDER BY 2, 3",
        (db,),
    )


def test_revoke_connect_on_default_privileges_gives_the_same_rights_back(pg: PgServer, dbname: str, roles):
    """A database never granted on (datacl NULL: PUBLIC may connect): the same rights after the block."""
    outsider = roles("pgops_anyone")
    assert datacl(pg, dbname) is None and can_connect(pg, dbname, outsider)
    before = effective_acl(pg, dbname)
    clear_sessions(pg.params(), ClearRequest(db=dbname, state="blocked", block="revoke_connect"))
    assert not can_connect(pg, dbname, outsider)
    clear_sessions(pg.params(), ClearRequest(db=dbname, state="allowed", block="revoke_connect"))
    assert effective_acl(pg, dbname) == before and can_connect(pg, dbname, outsider)


def test_revoke_connect_with_a_role_named_public(pg: PgServer, dbname: str, roles):
    """A role may be called "PUBLIC" (quoted): it is not the PUBLIC pseudo-role, and must not become it."""
    odd = roles("PUBLIC")
    outsider = roles("pgops_outsider")
    pg.sql(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident(dbname)))
    pg.sql(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(ident(dbname), ident(odd)))
    before = datacl(pg, dbname)
    assert can_connect(pg, dbname, odd) and not can_connect(pg, dbname, outsider)
    try:
        clear_sessions(pg.params(), ClearRequest(db=dbname, state="blocked", block="revoke_connect"))
        assert not can_connect(pg, dbname, odd)
        clear_sessions(pg.params(), ClearRequest(db=dbname, state="allowed", block="revoke_connect"))
    finally:
        assert datacl(pg, dbname) == before, "the ACL changed"
        assert not can_connect(pg, dbname, outsider), "every role may connect now: CONNECT went to PUBLIC"


def test_methods_render_statements_the_server_runs(pg: PgServer, dbname: str, roles):
    """The block methods' SQL, rendered by a real connection, closes and reopens exactly."""
    app = roles("pgops_render")
    pg.sql(sql.SQL("GRANT CONNECT ON DATABASE {} TO {} WITH GRANT OPTION").format(ident(dbname), ident(app)))
    before = datacl(pg, dbname)
    with pg.connect() as conn:
        for method in (AllowConnections(), RevokeConnect()):
            state = method.snapshot(conn, dbname)
            assert not state.closed
            texts = [s.as_string(conn) for s in method.close_sql(dbname, state)]
            assert all(ident(dbname).as_string(conn) in t for t in texts)
            method.close(conn, dbname, state)
            assert method.snapshot(conn, dbname).closed
            method.open(conn, dbname, state)
            assert not method.snapshot(conn, dbname).closed
    assert allows_connections(pg, dbname) and datacl(pg, dbname) == before
