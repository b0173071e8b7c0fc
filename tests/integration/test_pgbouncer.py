"""The switch behind real PgBouncers (Debian's pgbouncer): PAUSE/RESUME around it, on every way out.

A probe of 20 clients queries through PgBouncer (transaction pooling) every 10 ms while a restore
switches the database under it: with pgbouncers, no query fails; without (the control run), some do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.copies import staging_name
from ansible_collections.pgops.dbrestore.plugins.module_utils.pooler import PAUSE_TIMED_OUT
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from tests.conftest import drop_database
from tests.harness.ansible_run import run_module
from tests.harness.pg import PgServer, client_bindir
from tests.harness.pgbouncer import PgBouncer, Probe
from tests.harness.restore_process import paused_restore

pytestmark = pytest.mark.newest_major
LIVE = 'hoge "pooled"; ü'
ALIAS = "hoge_pooled"  # the name the app uses in PgBouncer; differs from the database's


@pytest.fixture
def bouncer(pg: PgServer):
    b = PgBouncer(pg, aliases={ALIAS: LIVE}).start()
    yield b
    b.stop()


def _db_with(pg: PgServer, name: str, value: str) -> None:
    pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    pg.sql("CREATE TABLE marker (v text)", dbname=name)
    pg.sql("INSERT INTO marker VALUES (%s)", (value,), dbname=name)


@pytest.fixture
def marker_dumps(pg: PgServer, tmp_path: Path):
    """A live database reading 'old', and dumps reading 'new' and 'newer'."""
    made = {}
    for value in ("new", "newer"):
        src = f"pooled_src_{value}"
        drop_database(pg, src)
        _db_with(pg, src, value)
        made[value] = tmp_path / f"{value}.dump"
        subprocess.run([str(client_bindir() / "pg_dump"), "-Fc", "-f", str(made[value]), "-d", src],
                       env=pg.client_env(), check=True)  # fmt: skip
        drop_database(pg, src)
    _db_with(pg, LIVE, "old")
    yield made
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (LIVE + "%",)):
        drop_database(pg, name)


def restore(pg: PgServer, src: Path, **kw):
    request = RestoreRequest(db=LIVE, src=str(src), jobs=1, bindir=str(client_bindir()), **kw)
    return restore_database(pg.params(), request)


def test_pause_makes_the_switch_invisible_to_pooled_clients(pg: PgServer, bouncer: PgBouncer, marker_dumps):
    with Probe(bouncer.conninfo(ALIAS), "SELECT v FROM marker", clients=20, interval=0.01) as probe:
        probe.wait_all_read("old")
        res = restore(pg, marker_dumps["new"], pgbouncers=[bouncer.target(ALIAS)], pgbouncer_pause_timeout=5)
        probe.wait_all_read("new")
        paused_failed, paused_longest, paused_queries = probe.failed, probe.longest_ms, probe.queries
        # the queries that waited in the pause: running at some moment from PAUSE to a second after the switch
        in_switch = probe.longest_between(res.switched_at - res.pgbouncer_pause_ms / 1000 - 0.05, res.switched_at + 1)

        # control run: the same probe, the same switch without pgbouncers
        res_control = restore(pg, marker_dumps["newer"])
        probe.wait_all_read("newer")
        control_failed = probe.failed - paused_failed

        # a rollback behind PgBouncer pauses it too
        before_rollback = probe.failed
        back = restore_database(pg.params(), RestoreRequest(db=LIVE, rollback=True, pgbouncers=[bouncer.target(ALIAS)]))
        probe.wait_all_read("new")
        assert probe.failed == before_rollback, probe.errors[before_rollback:]
        assert back.pgbouncers[0]["resumed"] and back.pgbouncer_pause_ms > 0
    print(f"\nwith pgbouncers: {paused_queries} queries, {paused_failed} failed, longest query during the switch "
          f"{in_switch:.0f} ms (target 250), over the whole restore {paused_longest:.0f} ms; PgBouncer paused "
          f"{res.pgbouncer_pause_ms} ms: {res.pgbouncer_window_ms}; without: {control_failed} failed, "
          f"e.g. {probe.errors[-1:]}")  # fmt: skip
    assert paused_failed == 0, probe.errors
    assert res.pgbouncers == [{"address": f"127.0.0.1:{bouncer.port}", "database": ALIAS, "paused": True,
                               "skipped": "", "drain_ms": res.pgbouncers[0]["drain_ms"], "resumed": True}]  # fmt: skip
    assert 0 < res.pgbouncer_pause_ms < 5000
    window = res.pgbouncer_window_ms
    assert set(window) == {"pause", "close", "terminate", "rename", "resume", "other", "total"}, window
    assert window["total"] == res.pgbouncer_pause_ms and sum(window.values()) == 2 * window["total"], window
    # the target is 250 ms; the bounds leave room for a loaded CI machine (two other test workers), and still fail
    # when RESUME comes late, only from the guard, or after PgBouncer's server_login_retry (1 s here)
    assert in_switch < 900, f"a pooled query waited {in_switch:.0f} ms in the switch"
    assert paused_longest < 3000, f"a pooled query waited {paused_longest:.0f} ms"
    assert res.terminated_count == 0, "PAUSE closed PgBouncer's server connections: nothing was left to end"
    assert not bouncer.paused(ALIAS)
    assert control_failed > 0, "the control run without pgbouncers showed no error: the probe proves nothing"
    assert res_control.pgbouncer_pause_ms == 0 and res_control.terminated_count > 0


def test_killed_while_paused_the_guard_resumes(pg: PgServer, bouncer: PgBouncer, marker_dumps, tmp_path: Path):
    with Probe(bouncer.conninfo(ALIAS), "SELECT v FROM marker", clients=4) as probe:
        probe.wait_all_read("old")
        request = {"db": LIVE, "src": str(marker_dumps["new"]), "jobs": 1, "pgbouncers": [bouncer.target(ALIAS)]}
        proc = paused_restore(pg, request, "pgbouncer-paused", tmp_path)
        assert bouncer.paused(ALIAS)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while bouncer.paused(ALIAS):
            assert time.monotonic() < deadline, "PgBouncer is still paused 30 s after the run was killed"
            time.sleep(0.05)
        probe.wait_all_read("old")  # the queries that waited ran, on the untouched live database
        assert probe.failed == 0, probe.errors
    staging = staging_name(LIVE)
    assert pg.sql("SELECT 1 FROM pg_database WHERE datname = %s", (staging,)), "the killed run staged a copy"
    res = restore(pg, marker_dumps["new"], pgbouncers=[bouncer.target(ALIAS)])  # the next run cleans up
    assert staging in res.dropped and pg.sql("SELECT v FROM marker", dbname=LIVE) == [("new",)]


def test_pause_timeout_resumes_and_switches_nothing(pg: PgServer, bouncer: PgBouncer, marker_dumps):
    """A transaction through PgBouncer outlasts pgbouncer_pause_timeout: RESUME, nothing switched, the staged copy
    dropped, and the clients (the long transaction included) carry on."""
    with psycopg.connect(autocommit=True, prepare_threshold=None, **bouncer.conninfo(ALIAS)) as long_tx:
        long_tx.execute("BEGIN")
        long_tx.execute("SELECT v FROM marker")
        with pytest.raises(PgOpsError) as err:
            restore(pg, marker_dumps["new"], pgbouncers=[bouncer.target(ALIAS)], pgbouncer_pause_timeout=1)
        assert err.value.sqlstate == PAUSE_TIMED_OUT
        assert err.value.details["pgbouncers"][0]["resumed"] and not err.value.details["pgbouncers"][0]["paused"]
        assert not bouncer.paused(ALIAS)
        assert long_tx.execute("SELECT v FROM marker").fetchone() == ("old",)
        long_tx.execute("COMMIT")
    assert pg.sql("SELECT v FROM marker", dbname=LIVE) == [("old",)]
    assert not pg.sql("SELECT 1 FROM pg_database WHERE datname = %s", (staging_name(LIVE),))


def test_session_pooling_with_clients_is_refused_unless_the_fallback_is_allowed(pg: PgServer, marker_dumps):
    session = PgBouncer(pg, pool_mode="session").start()
    try:
        with Probe(session.conninfo(LIVE), "SELECT v FROM marker", clients=2) as probe:
            probe.wait_all_read("old")
            for check_mode in (True, False):
                with pytest.raises(PgOpsError) as err:
                    restore_database(pg.params(), RestoreRequest(db=LIVE, src=str(marker_dumps["new"]), jobs=1,
                                                                 bindir=str(client_bindir()),
                                                                 pgbouncers=[session.target()]),
                                     check_mode=check_mode)  # fmt: skip
                problems = err.value.details["problems"]
                assert len(problems) == 1 and f":{session.port}" in problems[0]
            assert pg.sql("SELECT v FROM marker", dbname=LIVE) == [("old",)]
            assert not pg.sql("SELECT 1 FROM pg_database WHERE datname = %s", (staging_name(LIVE),))

            res = restore(pg, marker_dumps["new"], pgbouncers=[session.target()], pgbouncer_fallback="switch")
            assert res.pgbouncers[0]["paused"] is False and res.pgbouncers[0]["skipped"]
            assert res.pgbouncer_pause_ms == 0 and res.terminated_count >= 2  # the plain switch ended them
            probe.wait_all_read("new")
    finally:
        session.stop()


def test_unreachable_pgbouncer_is_found_in_check_mode(pg: PgServer, marker_dumps):
    from tests.harness.pg import free_port

    with pytest.raises(PgOpsError) as err:
        restore_database(pg.params(), RestoreRequest(db=LIVE, src=str(marker_dumps["new"]), bindir=str(client_bindir()),
                                                     pgbouncers=[{"host": "127.0.0.1", "port": free_port()}]),
                         check_mode=True)  # fmt: skip
    assert len(err.value.details["problems"]) == 1
    with pytest.raises(PgOpsError):
        RestoreRequest(db=LIVE, src=str(marker_dumps["new"]), strategy="replace", pgbouncers=[{"host": "127.0.0.1"}])


def test_module_options_pause_and_keep_the_password_out(pg: PgServer, bouncer: PgBouncer, marker_dumps):
    args = {**pg.module_args(), "db": LIVE, "src": str(marker_dumps["new"]), "bindir": str(client_bindir()),
            "pgbouncers": [bouncer.target(ALIAS)], "pgbouncer_pause_timeout": 5}  # fmt: skip
    checked = run_module("pgops.dbrestore.pg_restore_db", args, check=True)
    assert checked["changed"] and not checked.get("failed"), checked.get("msg")
    assert checked["plan"][-1].startswith("pause 1 PgBouncer(s), ") and checked["pgbouncer_pause_ms"] == 0
    done = run_module("pgops.dbrestore.pg_restore_db", args)
    assert done["changed"] and not done.get("failed"), done.get("msg")
    assert done["pgbouncers"][0]["paused"] and done["pgbouncers"][0]["resumed"] and done["pgbouncer_pause_ms"] > 0
    assert "pgops-test-secret" not in json.dumps(done)
    assert not bouncer.paused(ALIAS)
