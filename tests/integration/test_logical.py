"""Logical replication through the switch, with a real publisher (wal_level=logical) and subscriber.

The subscriber's live database streams from the publisher; a restore of it hands the subscription's slot
over to the restored copy (logical_subscriptions=hand_over), and a restore of the publishing database
recreates the slot the subscriber streams from on the restored copy (logical_slots=recreate). Without
either option the preflight refuses, in check mode too.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from tests.harness.pg import SUPERUSER, SUPERUSER_PASSWORD, PgServer, client_bindir, start_server

pytestmark = pytest.mark.newest_major
LIVE = 'hoge "sub"; ü'
SRC = "pub_src"


@pytest.fixture
def publisher(pg: PgServer):
    p = start_server(pg.major, wal_level="logical")
    p.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(SRC)))
    p.sql("CREATE TABLE t (id serial PRIMARY KEY, v text)", dbname=SRC)
    p.sql("CREATE PUBLICATION pub FOR TABLE t", dbname=SRC)
    p.sql("INSERT INTO t (v) VALUES ('one')", dbname=SRC)
    yield p
    p.destroy()


@pytest.fixture
def subscriber(pg: PgServer, publisher: PgServer):
    """pg's LIVE streams table t from the publisher (subscription "sub", slot "sub" there)."""
    pg.sql("ALTER SYSTEM SET wal_retrieve_retry_interval = '100ms'")
    pg.sql("SELECT pg_reload_conf()")
    pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(LIVE)))
    pg.sql("CREATE TABLE t (id int PRIMARY KEY, v text)", dbname=LIVE)
    conninfo = (f"host=127.0.0.1 port={publisher.port} user={SUPERUSER} password={SUPERUSER_PASSWORD} "
                f"dbname={SRC}")  # fmt: skip
    pg.sql(sql.SQL("CREATE SUBSCRIPTION sub CONNECTION {} PUBLICATION pub").format(sql.Literal(conninfo)), dbname=LIVE)
    wait_for(lambda: values(pg, LIVE) == ["one"], "the subscriber copied the table")
    yield pg
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (LIVE + "%",)):
        pg.sql("UPDATE pg_database SET datallowconn = true WHERE datname = %s", (name,))
        for (sub,) in pg.sql("SELECT subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
                             "WHERE d.datname = %s", (name,)):  # fmt: skip
            for stmt in ("ALTER SUBSCRIPTION {} DISABLE", "ALTER SUBSCRIPTION {} SET (slot_name = NONE)",
                         "DROP SUBSCRIPTION {}"):  # fmt: skip
                pg.sql(sql.SQL(stmt).format(sql.Identifier(sub)), dbname=name)
        pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        pg.sql(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    pg.sql("ALTER SYSTEM RESET wal_retrieve_retry_interval")
    pg.sql("SELECT pg_reload_conf()")


def values(server: PgServer, db: str) -> list[str]:
    return [v for (v,) in server.sql("SELECT v FROM t ORDER BY id", dbname=db)]


def wait_for(cond, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(0.05)


def dump(server: PgServer, db: str, path: Path) -> str:
    subprocess.run([str(client_bindir() / "pg_dump"), "-Fc", "-f", str(path), "-d", db], env=server.client_env(),
                   check=True)  # fmt: skip
    return str(path)


def restore(server: PgServer, db: str, src: str, check_mode: bool = False, **kw):
    request = RestoreRequest(db=db, src=src, jobs=1, bindir=str(client_bindir()), **kw)
    return restore_database(server.params(), request, check_mode=check_mode)


def test_subscription_and_slot_follow_the_switch(publisher: PgServer, subscriber: PgServer, tmp_path: Path):
    pg = subscriber
    sub_dump = dump(pg, LIVE, tmp_path / "sub.dump")  # as a superuser: with CREATE SUBSCRIPTION … connect = false

    # refused unless told how, in check mode too
    with pytest.raises(PgOpsError) as err:
        restore(pg, LIVE, sub_dump, check_mode=True, force=True)
    [problem] = err.value.details["problems"]
    assert "enabled subscriptions sub" in problem and "logical_subscriptions=hand_over" in problem

    checked = restore(pg, LIVE, sub_dump, check_mode=True, force=True, logical_subscriptions="hand_over")
    assert any("hand the slots of subscriptions sub to the restored copy" in s for s in checked.plan), checked.plan

    # hand over: the restored copy streams from the same slot, the old copy keeps its subscription disabled, slotless
    publisher.sql("INSERT INTO t (v) VALUES ('two')", dbname=SRC)
    wait_for(lambda: values(pg, LIVE) == ["one", "two"], "the live copy streamed 'two'")
    res = restore(pg, LIVE, sub_dump, force=True, logical_subscriptions="hand_over")
    assert res.logical["subscriptions"] == [{"name": "sub", "slot": "sub", "enabled": True}]
    assert values(pg, LIVE) == ["one"]  # the dump's data
    publisher.sql("INSERT INTO t (v) VALUES ('three')", dbname=SRC)
    wait_for(lambda: values(pg, LIVE) == ["one", "three"], "the restored copy streamed 'three'")
    old = pg.sql("SELECT s.subenabled, s.subslotname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
                 "WHERE d.datname = %s", (res.previous_db,))  # fmt: skip
    assert old == [(False, None)]
    assert publisher.sql("SELECT slot_name FROM pg_replication_slots") == [("sub",)]

    # the next restore drops that old copy (keep_previous=1): its subscription goes, the publisher's slot stays
    res2 = restore(pg, LIVE, sub_dump, force=True, logical_subscriptions="hand_over")
    assert res.previous_db in res2.dropping
    publisher.sql("INSERT INTO t (v) VALUES ('four')", dbname=SRC)
    wait_for(lambda: values(pg, LIVE) == ["one", "four"], "the restored copy streamed 'four'")
    assert publisher.sql("SELECT slot_name FROM pg_replication_slots") == [("sub",)]

    # a rollback hands the slot back to the copy it puts in place, the same way
    back = restore_database(pg.params(), RestoreRequest(db=LIVE, rollback=True, logical_subscriptions="hand_over"))
    assert back.logical["subscriptions"] == [{"name": "sub", "slot": "sub", "enabled": True}]
    publisher.sql("INSERT INTO t (v) VALUES ('back')", dbname=SRC)
    wait_for(lambda: values(pg, LIVE) == ["one", "three", "back"], "the rolled-back copy streamed 'back'")

    # the publishing database: its slot (the subscriber's) is refused, or recreated on the restored copy
    pub_dump = dump(publisher, SRC, tmp_path / "pub.dump")
    with pytest.raises(PgOpsError) as err:
        restore(publisher, SRC, pub_dump, check_mode=True, force=True)
    [problem] = err.value.details["problems"]
    assert "logical replication slots sub" in problem and "logical_slots=recreate" in problem
    checked = restore(publisher, SRC, pub_dump, check_mode=True, force=True, logical_slots="recreate")
    assert any("drop the logical slots sub and create them again on the restored copy" in s for s in checked.plan)
    res3 = restore(publisher, SRC, pub_dump, force=True, logical_slots="recreate")
    [slot] = res3.logical["slots"]
    assert slot["name"] == "sub" and slot["plugin"] == "pgoutput"
    assert publisher.sql("SELECT database FROM pg_replication_slots") == [(SRC,)]
    slot_oid = publisher.sql("SELECT datoid FROM pg_replication_slots")[0][0]
    assert slot_oid == publisher.sql("SELECT oid FROM pg_database WHERE datname = %s", (SRC,))[0][0]
    publisher.sql("INSERT INTO t (v) VALUES ('five')", dbname=SRC)  # written to the restored publisher
    wait_for(lambda: values(pg, LIVE)[-1:] == ["five"], "the subscriber streamed 'five' from the restored copy")
