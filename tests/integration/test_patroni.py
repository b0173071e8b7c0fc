"""The restart fallback on a server managed by Patroni (Debian's patroni + etcd-server, one-node cluster).

The login role owns the database but may not end a superuser's session there, so clearing it needs
the restart fallback. `systemctl`, `service` and `pg_ctl` on PATH are stand-ins that only record being
called: none of them may run on a managed node.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psycopg
import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError, connect, server_info
from ansible_collections.pgops.dbrestore.plugins.module_utils.preflight import Preflight
from ansible_collections.pgops.dbrestore.plugins.module_utils.restart import RestartSpec
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import ClearRequest, clear_sessions
from tests.conftest import selected_majors
from tests.harness.patroni import PatroniCluster
from tests.harness.pg import SUPERUSER, SUPERUSER_PASSWORD

DB = "hoge_managed"


@pytest.fixture(scope="module")
def cluster():
    c = PatroniCluster(max(selected_majors())).start()
    with psycopg.connect(autocommit=True, **_conninfo(c, "postgres")) as conn:
        conn.execute("CREATE ROLE ops LOGIN PASSWORD 'ops-secret'")
        conn.execute(f"CREATE DATABASE {DB} OWNER ops")
    yield c
    c.stop()


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """systemctl, service and pg_ctl first on PATH, each appending its argv to a file."""
    calls = tmp_path / "calls"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("systemctl", "service", "pg_ctl"):
        script = bindir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return calls


def _conninfo(c: PatroniCluster, dbname: str) -> dict:
    return dict(host="127.0.0.1", port=c.port, user=SUPERUSER, password=SUPERUSER_PASSWORD, dbname=dbname)


def _clear(c: PatroniCluster, spec: RestartSpec):
    request = ClearRequest(db=DB, state="terminated", block="allow_connections", fallback="restart", restart=spec)
    return clear_sessions(c.params(login_user="ops", login_password="ops-secret"), request)


def test_restart_goes_through_patroni_and_the_member_stays_leader(cluster: PatroniCluster, recorder: Path):
    before = cluster.member()
    held = psycopg.connect(autocommit=True, **_conninfo(cluster, DB))  # a superuser's session: ops cannot end it
    spec = RestartSpec(service="postgresql", patroni_url=cluster.api, timeout=60)
    res = _clear(cluster, spec)
    assert res.restarted and res.restart_command == ["POST", f"{cluster.api}/restart"]
    after = cluster.member()
    assert after["postmaster_start_time"] != before["postmaster_start_time"], "not restarted"
    assert after["role"] in ("master", "primary") and after["state"] == "running" and after["timeline"] == 1
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    assert not recorder.exists(), recorder.read_text()
    with psycopg.connect(autocommit=True, **_conninfo(cluster, DB)) as conn:  # reopened
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_systemctl_and_pg_ctl_are_refused_on_a_managed_node(cluster: PatroniCluster, recorder: Path):
    before = cluster.member()
    held = psycopg.connect(autocommit=True, **_conninfo(cluster, DB))
    try:
        spec = RestartSpec(data_dir=str(cluster.data_dir), pg_ctl="pg_ctl", timeout=60)
        with connect(cluster.params(login_user="ops", login_password="ops-secret")) as conn:
            problems = Preflight(conn, server_info(conn)).can_switch(DB, "restart", spec).problems
        assert len(problems) == 1 and "patroni.dynamic.json" in problems[0]  # check mode finds it
        with pytest.raises(PgOpsError):
            _clear(cluster, spec)
        assert held.execute("SELECT 1").fetchone() == (1,), "the session was ended anyway"
        assert cluster.member()["postmaster_start_time"] == before["postmaster_start_time"]
        with psycopg.connect(autocommit=True, **_conninfo(cluster, DB)) as conn:  # the block was given back
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert not recorder.exists(), recorder.read_text()
    finally:
        held.close()
