"""pg_terminate_connections through ansible-playbook: argument handling, check/diff mode, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from psycopg import sql

from tests.harness.ansible_run import ansible_env, run_module
from tests.harness.pg import PgServer
from tests.integration.test_terminate import sessions_on, storm_for

MODULE = "pgops.dbrestore.pg_terminate_connections"
# the Ansible wiring does not depend on the server version: oldest and newest selected major only
pytestmark = pytest.mark.edge_majors


def test_playbook_block_and_reopen(pg: PgServer, dbname: str):
    with storm_for(pg, dbname, clients=12) as storm:
        storm.wait_connected()
        args = {**pg.module_args(), "db": dbname, "state": "blocked", "block_new_connections": "allow_connections"}

        checked = run_module(MODULE, args, check=True, diff=True)
        assert checked["changed"] and checked["count"] == 12, checked["_stdout"]
        assert checked["diff"]["before"]["sessions"] == 12
        assert sessions_on(pg, dbname) == 12 and storm.total_broken == 0

        done = run_module(MODULE, args)
        assert not done.get("failed"), done.get("msg")
        assert done["changed"] and done["blocked"] and done["count"] >= 12
        assert {"pid", "user", "application", "client", "state", "backend_start"} <= set(done["terminated"][0])
        assert "pgops-test-secret" not in json.dumps(done), "the password leaked into the result"
        pg.sql(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(dbname), sql.Identifier(dbname + "x")))
        pg.sql(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(dbname + "x"), sql.Identifier(dbname)))

        reopened = run_module(MODULE, {**pg.module_args(), "db": dbname, "state": "allowed"})
        assert reopened["changed"] and not reopened["blocked"]
        storm.wait_connected()
        again = run_module(MODULE, {**pg.module_args(), "db": dbname, "state": "allowed"})
        assert not again["changed"]


def test_playbook_errors_are_clear(pg: PgServer):
    wrong = run_module(MODULE, {**pg.module_args(login_password="nope"), "db": "postgres"})
    assert wrong["failed"] and "password authentication failed" in wrong["msg"]
    assert "\n" not in wrong["msg"] and "nope" not in wrong["_stdout"]
    missing = run_module(MODULE, {**pg.module_args(), "db": "absent_db"})
    assert missing["failed"] and missing["msg"].startswith('database "absent_db" does not exist')
    bad = run_module(MODULE, {**pg.module_args(), "db": "postgres", "state": "blocked"})
    assert bad["failed"] and "block_new_connections" in bad["msg"]
    bad_addr = run_module(MODULE, {**pg.module_args(), "db": "postgres", "client_addrs": ["10.0.0.300"]})
    assert bad_addr["failed"] and "10.0.0.300" in bad_addr["msg"]


def test_ansible_doc_renders():
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-doc"), MODULE],
        env=ansible_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "[WARNING]" not in proc.stderr, proc.stderr
    for word in ("block_new_connections", "login_password", "EXAMPLES", "RETURN VALUES", "elapsed_ms"):
        assert word in proc.stdout
