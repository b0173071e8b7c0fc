"""pg_terminate_connections through ansible-playbook: argument handling, filters, check/diff mode, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.harness.ansible_run import ansible_env, run_module
from tests.harness.pg import SUPERUSER, SUPERUSER_PASSWORD, PgServer
from tests.integration.test_terminate import allows_connections, can_connect, datacl, roles, sessions_on, storm_for

MODULE = "pgops.dbrestore.pg_terminate_connections"
# the Ansible wiring does not depend on the server version: oldest and newest selected major only
pytestmark = pytest.mark.edge_majors
__all__ = ["roles"]  # the fixture, shared with test_terminate.py


def test_playbook_block_and_reopen(pg: PgServer, dbname: str):
    with storm_for(pg, dbname, clients=12) as storm:
        storm.wait_connected()
        args = {**pg.module_args(), "db": dbname, "state": "blocked", "block_new_connections": "allow_connections"}

        checked = run_module(MODULE, args, check=True, diff=True)
        assert checked["changed"] and checked["terminated_count"] == 12, checked["_stdout"]
        assert "count" not in checked and len(checked["terminated"]) == 12
        assert checked["diff"]["before"] == {"blocked": False, "sessions": 12}
        assert sessions_on(pg, dbname) == 12 and storm.total_broken == 0

        done = run_module(MODULE, args)
        assert not done.get("failed"), done.get("msg")
        assert done["changed"] and done["blocked"] and done["terminated_count"] >= 12
        assert done["terminated_count"] == len(done["terminated"])
        assert {"pid", "user", "application", "client", "state", "backend_start"} == set(done["terminated"][0])
        assert "pgops-test-secret" not in json.dumps(done), "the password leaked into the result"
        assert not allows_connections(pg, dbname) and sessions_on(pg, dbname) == 0
        # nobody is in it: it can be renamed away and back
        pg.sql(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(dbname), sql.Identifier(dbname + "x")))
        pg.sql(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(dbname + "x"), sql.Identifier(dbname)))

        since = storm.connects_now()
        reopened = run_module(MODULE, {**pg.module_args(), "db": dbname, "state": "allowed"})
        assert reopened["changed"] and not reopened["blocked"] and allows_connections(pg, dbname)
        storm.wait_reconnected(since)  # every client got a new connection after the reopen
        again = run_module(MODULE, {**pg.module_args(), "db": dbname, "state": "allowed"})
        assert not again["changed"]


def test_playbook_errors_are_clear(pg: PgServer):
    wrong = run_module(MODULE, {**pg.module_args(login_password="nope"), "db": "postgres"})
    assert wrong["failed"] and "password authentication failed" in wrong["msg"]
    assert "\n" not in wrong["msg"] and "nope" not in wrong["_stdout"]
    missing = run_module(MODULE, {**pg.module_args(), "db": "absent_db"})
    assert missing["failed"] and missing["msg"].startswith('database "absent_db" does not exist on postgres@')
    bad = run_module(MODULE, {**pg.module_args(), "db": "postgres", "state": "blocked"})
    assert bad["failed"] and bad["msg"] == (
        "state=blocked needs block_new_connections=allow_connections or revoke_connect"
    )
    bad_addr = run_module(MODULE, {**pg.module_args(), "db": "postgres", "client_addrs": ["10.0.0.300"]})
    assert bad_addr["failed"] and "client address '10.0.0.300' is neither an address" in bad_addr["msg"]


def test_playbook_session_filters_end_exactly_the_matching_sessions(pg: PgServer, dbname: str, roles):
    """Each filter spares one session that every other filter matches; only the three left are ended."""
    app, batch = roles("pgops_web_app"), roles("pgops_batch")

    def tcp(name: str, user: str = app, password: str = "pw", autocommit: bool = True, host: str = "127.0.0.1"):
        return psycopg.connect(host=host, port=pg.port, dbname=dbname, user=user, password=password,
                               application_name=name, autocommit=autocommit)  # fmt: skip

    conns = {
        "ended-1": tcp("unicorn worker-1"),
        "ended-2": tcp("unicorn worker-2"),
        "ended-3": tcp("unicorn worker-3"),
        "application_names": tcp("sidekiq-1"),
        "exclude_application_names": tcp("unicorn worker-0"),
        "users": tcp("unicorn worker-7", SUPERUSER, SUPERUSER_PASSWORD),
        "exclude_users": tcp("unicorn worker-8", batch),
        "session_states": tcp("unicorn worker-9", autocommit=False),
        "client_addrs": tcp("unicorn worker-5", host=str(pg.socket_dir)),  # a unix-socket client
    }
    try:
        conns["session_states"].execute("SELECT 1")  # stays idle in transaction
        pids = {k: c.info.backend_pid for k, c in conns.items()}
        ended = {pids["ended-1"], pids["ended-2"], pids["ended-3"]}
        args = {
            **pg.module_args(),
            "db": dbname,
            "users": [app, batch],
            "exclude_users": [batch],
            "application_names": ["unicorn*"],
            "exclude_application_names": ["unicorn worker-0"],
            "client_addrs": ["127.0.0.0/8", "::1"],
            "session_states": ["idle"],
        }
        checked = run_module(MODULE, args, check=True)
        assert not checked.get("failed"), checked.get("msg")
        assert {s["pid"] for s in checked["terminated"]} == ended and checked["terminated_count"] == 3
        assert sessions_on(pg, dbname) == len(conns), "check mode ended a session"

        done = run_module(MODULE, args)
        assert not done.get("failed"), done.get("msg")
        assert {s["pid"] for s in done["terminated"]} == ended and done["changed"]
        assert {s["user"] for s in done["terminated"]} == {app}
        assert {s["client"] for s in done["terminated"]} == {"127.0.0.1"}
        alive = {r[0] for r in pg.sql("SELECT pid FROM pg_stat_activity WHERE datname = %s", (dbname,))}
        assert alive == set(pids.values()) - ended, "a session outside the filters was ended, or one was kept"
        for key, conn in conns.items():
            if key.startswith("ended"):
                with pytest.raises(psycopg.OperationalError, match="terminating connection"):
                    conn.execute("SELECT 1")

        # the unix-socket session, by itself
        local = run_module(MODULE, {**pg.module_args(), "db": dbname, "client_addrs": ["local"],
                                    "exclude_users": [SUPERUSER], "session_states": ["idle"]})  # fmt: skip
        assert [s["pid"] for s in local["terminated"]] == [pids["client_addrs"]]
        assert local["terminated"][0]["client"] is None
    finally:
        for conn in conns.values():
            conn.close()


def test_playbook_revoke_connect_blocks_the_app_role_and_gives_its_grant_back(pg: PgServer, dbname: str, roles):
    app = roles("pgops_unicorn")  # not a superuser: revoke_connect shuts it out
    ident = sql.Identifier
    pg.sql(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident(dbname)))
    pg.sql(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(ident(dbname), ident(app)))
    before = datacl(pg, dbname)
    assert can_connect(pg, dbname, app)
    with storm_for(pg, dbname, clients=8, user=app, password="pw") as storm:
        storm.wait_connected()
        args = {**pg.module_args(), "db": dbname, "state": "blocked", "block_new_connections": "revoke_connect"}
        done = run_module(MODULE, args)
        assert not done.get("failed"), done.get("msg")
        assert done["blocked"] and done["block_method"] == "revoke_connect" and done["terminated_count"] >= 8
        assert not can_connect(pg, dbname, app) and sessions_on(pg, dbname) == 0
        storm.wait_refused("permission denied for database")
        assert allows_connections(pg, dbname)  # the database itself is open: only the grant is gone

        since = storm.connects_now()
        reopened = run_module(MODULE, {**pg.module_args(), "db": dbname, "state": "allowed",
                                       "block_new_connections": "revoke_connect"})  # fmt: skip
        assert reopened["changed"] and not reopened.get("failed"), reopened.get("msg")
        assert datacl(pg, dbname) == before
        storm.wait_reconnected(since)
    assert can_connect(pg, dbname, app)


def test_ansible_doc_renders():
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-doc"), MODULE],
        env=ansible_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "[WARNING]" not in proc.stderr, proc.stderr
    for word in ("block_new_connections", "login_password", "EXAMPLES", "RETURN VALUES", "terminated_count"):
        assert word in proc.stdout
