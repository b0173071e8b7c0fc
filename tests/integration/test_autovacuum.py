"""An autovacuum worker in a database the switch renames costs the app nothing: the module ends it before the
renames (ALTER DATABASE RENAME would end it itself, then sleep 100 ms inside the app's window)."""

from __future__ import annotations

import time

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from tests.harness.dumps import make_dump
from tests.harness.pg import PgServer, client_bindir, start_server

pytestmark = pytest.mark.edge_majors  # backend_type, which names autovacuum workers, came in 10
LIVE = "vacuumed"
# a vacuum that lasts minutes: 200 000 dead rows read at the slowest cost settings
SLOW_VACUUM = """
CREATE TABLE dead (id int) WITH (autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1);
INSERT INTO dead SELECT pg_catalog.generate_series(1, 200000);
DELETE FROM dead;
"""


@pytest.fixture
def busy(pg: PgServer):
    """A server whose autovacuum looks at every database each second."""
    server = start_server(pg.major, autovacuum_naptime="1")
    yield server
    server.destroy()


def autovacuum_pids(pg: PgServer, db: str) -> list[int]:
    rows = pg.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' AND datname = %s", (db,))
    return [r[0] for r in rows]


def test_the_switch_ends_autovacuum_in_the_live_database(busy: PgServer, tmp_path):
    busy.sql("CREATE DATABASE src")
    busy.sql("CREATE TABLE t (id int)", dbname="src")
    dump = make_dump(busy, "src", "custom", tmp_path / "src.pgc")
    busy.sql(f"CREATE DATABASE {LIVE}")
    busy.sql(SLOW_VACUUM, dbname=LIVE)
    deadline = time.monotonic() + 60
    while not (workers := autovacuum_pids(busy, LIVE)):
        assert time.monotonic() < deadline, "autovacuum never came to the table of dead rows"
        time.sleep(0.1)

    res = restore_database(busy.params(), RestoreRequest(db=LIVE, src=str(dump), bindir=str(client_bindir())))
    assert res.changed and res.previous_db
    assert any(line.startswith("switch: ended autovacuum worker(s) [") for line in res.log), res.log
    assert busy.sql("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (workers,)) == [(0,)]
