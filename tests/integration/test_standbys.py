"""Streaming standbys follow the switch (standbys): their sessions on the old copy end once they replayed it.

The standby is a real pg_basebackup -R of the test server. Clients on it keep one connection and read
the database every 10 ms, reconnecting when it breaks, as a Rails app's `reading` role does.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from tests.conftest import drop_database
from tests.harness.pg import SUPERUSER, SUPERUSER_PASSWORD, PgServer, client_bindir, free_port, start_standby
from tests.harness.pgbouncer import Probe

pytestmark = pytest.mark.newest_major
LIVE = 'hoge "read"; ü'


@pytest.fixture
def standby(pg: PgServer):
    s = start_standby(pg)
    yield s
    s.destroy()


@pytest.fixture
def marker_dumps(pg: PgServer, tmp_path: Path):
    """A live database reading 'old', and dumps reading 'new' and 'newer'."""
    made = {}
    for value in ("old", "new", "newer"):
        name = LIVE if value == "old" else f"read_src_{value}"
        pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        pg.sql("CREATE TABLE marker (v text)", dbname=name)
        pg.sql("INSERT INTO marker VALUES (%s)", (value,), dbname=name)
        if value != "old":
            made[value] = tmp_path / f"{value}.dump"
            subprocess.run([str(client_bindir() / "pg_dump"), "-Fc", "-f", str(made[value]), "-d", name],
                           env=pg.client_env(), check=True)  # fmt: skip
            drop_database(pg, name)
    yield made
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (LIVE + "%",)):
        drop_database(pg, name)


def restore(pg: PgServer, src: Path, **kw):
    request = RestoreRequest(db=LIVE, src=str(src), jobs=1, bindir=str(client_bindir()), **kw)
    return restore_database(pg.params(), request)


def replayed_to(standby: PgServer, lsn: str) -> bool:
    return standby.sql("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))[0][0]


def test_standby_clients_read_the_restored_data_after_the_switch(pg: PgServer, standby: PgServer, marker_dumps):
    conninfo = dict(host="127.0.0.1", port=standby.port, user=SUPERUSER, password=SUPERUSER_PASSWORD, dbname=LIVE)
    target = {"host": "127.0.0.1", "port": standby.port}
    lsn = pg.sql("SELECT pg_current_wal_lsn()")[0][0]
    with Probe(conninfo, "SELECT 1", clients=0) as idle:
        idle.wait(lambda: replayed_to(standby, lsn), "the standby has the live database", 30)
    with Probe(conninfo, "SELECT v FROM marker", clients=8, interval=0.01) as probe:
        probe.wait_all_read("old")
        res = restore(pg, marker_dumps["new"], standbys=[target], standby_timeout=10)
        probe.wait_all_read("new", timeout=5)  # within a few seconds of the switch
        [report] = res.standbys
        assert report["replayed"] and report["error"] == "" and report["sessions_ended"] >= 8, report
        assert report["lag_ms"] < 10000 and report["lag_bytes"] >= 0

        # control run: the same switch without standbys; once the standby replayed it, its clients still read
        # the old copy, while a new session reads the restored one
        res_control = restore(pg, marker_dumps["newer"])
        lsn = pg.sql("SELECT pg_current_wal_lsn()")[0][0]
        probe.wait(lambda: replayed_to(standby, lsn), "the standby replayed the control switch", 30)
        since = [s.queries for s in probe.stats]
        probe.wait(lambda: all(s.queries >= n + 3 for s, n in zip(probe.stats, since, strict=True)), "3 more reads")
        assert {s.last_value for s in probe.stats} == {"new"}, "standby clients left the old copy by themselves"
        assert standby.sql("SELECT v FROM marker", dbname=LIVE) == [("newer",)]
        assert res_control.standbys == []
        current = standby.sql("SELECT DISTINCT datname FROM pg_stat_activity WHERE application_name LIKE 'probe-%'")
        assert current == [(res_control.previous_db,)], "the sessions sit on the renamed old copy"
    print(f"\nstandby: replayed {report['lag_ms']} ms after the switch ({report['lag_bytes']} bytes behind), "
          f"{report['sessions_ended']} sessions ended; control: the clients still read the old copy")  # fmt: skip


def test_standby_problems_are_found_before_anything_is_staged(pg: PgServer, marker_dumps):
    for target in ({"host": "127.0.0.1", "port": free_port()}, {"host": "127.0.0.1", "port": pg.port}):
        with pytest.raises(PgOpsError) as err:
            request = RestoreRequest(db=LIVE, src=str(marker_dumps["new"]), bindir=str(client_bindir()),
                                     standbys=[target])  # fmt: skip
            restore_database(pg.params(), request, check_mode=True)
        assert len(err.value.details["problems"]) == 1  # unreachable; not a standby (the primary itself)
    assert pg.sql("SELECT v FROM marker", dbname=LIVE) == [("old",)]


def test_discovered_standbys_follow_the_switch(pg: PgServer, standby: PgServer, marker_dumps):
    """discover_standbys: the standby is found in the primary's pg_stat_replication and reached at the address shown
    there, with the port its entry (by application_name) gives; a wrong entry is refused in check mode."""
    conninfo = dict(host="127.0.0.1", port=standby.port, user=SUPERUSER, password=SUPERUSER_PASSWORD, dbname=LIVE)
    [(app, addr)] = pg.sql("SELECT application_name, host(client_addr) FROM pg_stat_replication")
    lsn = pg.sql("SELECT pg_current_wal_lsn()")[0][0]
    with Probe(conninfo, "SELECT 1", clients=0) as idle:
        idle.wait(lambda: replayed_to(standby, lsn), "the standby has the live database", 30)

    def request(entries: list[dict], check_mode: bool = True):
        req = RestoreRequest(db=LIVE, src=str(marker_dumps["new"]), jobs=1, bindir=str(client_bindir()),
                             standbys=entries, discover_standbys=True, standby_timeout=10)  # fmt: skip
        return restore_database(pg.params(), req, check_mode=check_mode)

    # the entry for every standby gives a port where nothing listens; an entry names a standby that is not streaming
    for entries in ([{"port": free_port()}], [{"application_name": app, "port": standby.port},
                                              {"application_name": "db9"}]):  # fmt: skip
        with pytest.raises(PgOpsError) as err:
            request(entries)
        assert len(err.value.details["problems"]) == 1, err.value.details["problems"]
    with pytest.raises(PgOpsError, match="needs a host, or discover_standbys=true"):
        RestoreRequest(db=LIVE, src=str(marker_dumps["new"]), standbys=[{"application_name": app}])

    mapping = [{"application_name": app, "port": standby.port}]
    checked = request(mapping)
    assert checked.plan[-1].endswith(f"standby(s) {addr}:{standby.port} ({app}) to replay it and end their "
                                     "sessions on the old copy"), checked.plan  # fmt: skip
    with Probe(conninfo, "SELECT v FROM marker", clients=4, interval=0.01) as probe:
        probe.wait_all_read("old")
        res = request(mapping, check_mode=False)
        probe.wait_all_read("new", timeout=5)
    [report] = res.standbys
    assert report["address"] == f"{addr}:{standby.port}" and report["application_name"] == app
    assert report["replayed"] and report["sessions_ended"] >= 4 and report["error"] == "", report
