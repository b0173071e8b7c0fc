"""Progress a person can watch: the role runs the restore in the background and prints its line at a steady
interval, read here from a real ansible-playbook run while the restore is held in the middle of its load."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.progress import read_progress
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from tests.conftest import drop_database
from tests.harness.ansible_run import ansible_env
from tests.harness.dumps import make_dump
from tests.harness.pg import PgServer, client_bindir
from tests.integration.conftest import fingerprint_db
from tests.integration.test_playbooks import BIN, hoge_db, login_vars, write_inventory

pytestmark = pytest.mark.newest_major
__all__ = ["hoge_db"]  # the fixture

GATE_ROLE = "pgops_test_gate_open"
# Loading a row of table gate waits until the role GATE_ROLE exists (roles are cluster-wide, so the test opens
# the gate from any database): the restore stops in the middle of its load for as long as the test needs.
GATE_SQL = f"""
CREATE FUNCTION public.gate(x integer) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  WHILE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '{GATE_ROLE}') LOOP
    PERFORM pg_catalog.pg_sleep(0.05);
  END LOOP;
  RETURN true;
END $$;
CREATE TABLE public.gate (x integer CHECK (public.gate(x)));
INSERT INTO public.gate VALUES (1);
"""
LINE = re.compile(
    r"^hoge_db: (?P<phase>[a-z ]+?)(?: (?P<pct>\d+) %)? — (?P<tables>\d+)/12 tables, (?:[\d.]+ (?:[kMG]?B )?of "
    r"[\d.]+ [kMG]?B, )?(?P<idx>\d+)/22 indexes, (?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)$"
)


@pytest.fixture
def gated_dump(pg: PgServer, dumps, tmp_path: Path):
    pg.sql(sql.SQL("CREATE ROLE {}").format(sql.Identifier(GATE_ROLE)))
    pg.sql("CREATE DATABASE gate_source TEMPLATE chinook_source")
    pg.sql(GATE_SQL, dbname="gate_source")
    dump = make_dump(pg, "gate_source", "custom", tmp_path / "hoge_db.dump")
    pg.sql(sql.SQL("DROP ROLE {}").format(sql.Identifier(GATE_ROLE)))  # closed: a restore waits in table gate
    yield dump
    pg.sql(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(GATE_ROLE)))
    drop_database(pg, "gate_source")


@pytest.mark.parametrize("restored", ["one database", "a set"])
def test_role_prints_progress_lines_while_the_restore_runs(pg: PgServer, hoge_db: str, gated_dump: Path, dumps,
                                                           tmp_path: Path, restored: str):  # fmt: skip
    """Held in the middle of hoge_db's load, alone or as the second database of a set (staged one after another)."""
    progress_dir = tmp_path / "progress"
    host = {**login_vars(pg), "restore_bindir": str(client_bindir()), "restore_progress_interval": 1,
            "restore_progress_dir": str(progress_dir), "restore_jobs": 2}  # fmt: skip
    inventory = write_inventory(tmp_path / "inventory.json", host)
    what = ["-e", "db=hoge_db", "-e", f"dump={gated_dump}"]
    if restored == "a set":
        shutil.copy(dumps["chinook"]["custom"], gated_dump.parent / "shard_a.dump")
        what = ["-e", "dbs=shard_a,hoge_db", "-e", f"restore_backup_dir={gated_dump.parent}"]
    argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), "pgops.dbrestore.restore", *what]
    proc = subprocess.Popen(argv, env=ansible_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()

    def progress() -> list[re.Match]:
        return [m for m in (LINE.match(ln.rstrip("\n")) for ln in list(out)) if m]

    try:
        # held in table gate: every other table loaded, and a line a second keeps coming while it waits
        deadline = time.monotonic() + 60
        while not [m for m in progress() if m["phase"] == "staging" and m["tables"] == "11"][2:]:
            assert proc.poll() is None, "".join(out)
            assert time.monotonic() < deadline, "no progress lines showing 11/12 tables:\n" + "".join(out)
            time.sleep(0.1)
        held = json.loads((progress_dir / "hoge_db.json").read_text())
        assert held["state"] == "running" and held["phase"] == "stage" and held["tables_done"] == 11
        assert [c["table"] for c in held["copying"]] == ["public.gate"]  # pg_stat_progress_copy
    finally:
        pg.sql(sql.SQL("CREATE ROLE {}").format(sql.Identifier(GATE_ROLE)))  # open the gate
        assert proc.wait(timeout=120) == 0, "".join(out)
        reader.join(timeout=10)
    text = "".join(out)
    lines = progress()
    staging = [m for m in lines if m["phase"] == "staging"]
    assert len(staging) >= 3 and all(0 <= int(m["pct"]) < 100 for m in staging), text
    seconds = [int(m["h"]) * 3600 + int(m["m"]) * 60 + int(m["s"]) for m in lines]
    assert seconds == sorted(seconds) and seconds[-1] > seconds[0], text  # a clock that moves, line after line
    assert [int(m["tables"]) for m in lines] == sorted(int(m["tables"]) for m in lines)
    assert "[WARNING]" not in text and "hoge_db: restored from" in text, text
    assert fingerprint_db(pg, "hoge_db") == fingerprint_db(pg, "gate_source")
    if restored == "a set":
        assert fingerprint_db(pg, "shard_a") == fingerprint_db(pg, "chinook_source")
        assert "shard_a: restored from" in text, text
    final = json.loads((progress_dir / "hoge_db.json").read_text())
    assert final["state"] == "done" and final["tables_done"] == 12 and final["indexes_done"] == 22
    assert final["result"]["changed"] is True and "password" not in json.dumps(final)


# A restore that takes 32 s by construction and next to no CPU: each of the 320 rows of table slow passes a CHECK
# that sleeps 0.1 s as COPY loads it (the function sleeps only once the rows are in the source, so making the source
# is quick). ANALYZE does not run CHECKs, so the rest of the run is as fast as ever.
SLOW_ROWS = 320
SLOW_SQL = f"""
CREATE FUNCTION public.slow_ok(x integer) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';
CREATE TABLE public.slow (id integer PRIMARY KEY CHECK (public.slow_ok(id)), note text);
INSERT INTO public.slow SELECT g, 'row ' || g FROM generate_series(1, {SLOW_ROWS}) g;
CREATE TABLE public.quick (id integer PRIMARY KEY, note text);
INSERT INTO public.quick SELECT g, md5(g::text) FROM generate_series(1, 1000) g;
CREATE INDEX quick_note ON public.quick (note);
CREATE OR REPLACE FUNCTION public.slow_ok(x integer) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  PERFORM pg_catalog.pg_sleep(0.1);
  RETURN true;
END $$;
"""
SLOW_LINE = re.compile(
    r"^slow_db: (?P<phase>[a-z ]+?)(?: (?P<pct>\d+) %)? — (?P<tables>\d+)/2 tables, (?:[\d.]+ (?:[kMG]?B )?of "
    r"[\d.]+ [kMG]?B, )?(?P<idx>\d+)/3 indexes, (?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)$"
)


def test_a_long_role_run_prints_progress_at_the_default_interval(pg: PgServer, tmp_path: Path):
    """The only test of 30 s or more: a role run at default settings (restore_progress_interval 10) of a restore that
    takes over 30 s prints a progress line every 10 s while it runs, read from the playbook's output as it comes."""
    pg.sql("CREATE DATABASE slow_source")
    pg.sql("CREATE DATABASE slow_db")
    try:
        pg.sql(SLOW_SQL, dbname="slow_source")
        dump = make_dump(pg, "slow_source", "custom", tmp_path / "slow_db.dump")
        progress_dir = tmp_path / "progress"
        host = {**login_vars(pg), "restore_bindir": str(client_bindir()), "restore_progress_dir": str(progress_dir)}
        inventory = write_inventory(tmp_path / "inventory.json", host)
        argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), "pgops.dbrestore.restore", "-e", "db=slow_db",
                "-e", f"dump={dump}"]  # fmt: skip
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=ansible_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen: list[tuple[float, str]] = []  # (when it was read, line)
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append((time.monotonic() - started, line.rstrip("\n")))
        assert proc.wait(timeout=30) == 0, "\n".join(ln for _t, ln in seen)
        wall = time.monotonic() - started
    finally:
        for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname ~ '^slow_(source|db)'"):
            drop_database(pg, name)  # the previous copy and the staging copy of a failed run too
    text = "\n".join(ln for _t, ln in seen)
    lines = [(t, m) for t, m in ((t, SLOW_LINE.match(ln)) for t, ln in seen) if m]
    staging = [(t, m) for t, m in lines if m["phase"] == "staging"]
    assert wall >= SLOW_ROWS * 0.1, text
    # a line every 10 s while it loads: at least two, read while the play ran, 10 s apart (give or take a poll)
    assert len(staging) >= 2 and all(t < wall - 1 for t, _m in staging), text
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(staging)]
    assert all(5 <= g <= 20 for g in gaps), (gaps, text)  # 10 s, on a busy machine
    clock = [int(m["h"]) * 3600 + int(m["m"]) * 60 + int(m["s"]) for _t, m in lines]
    assert clock == sorted(clock) and clock[-1] >= 20, text
    assert all(int(m["tables"]) <= 2 and 0 <= int(m["pct"]) < 100 for _t, m in staging), text
    assert "slow_db: restored from" in text and "[WARNING]" not in text, text


# a kB of random hex a row (the subquery refers to g, so that it runs for each row)
BIG_ROWS = ("SELECT (SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, 32) i WHERE g > 0), g "
            "FROM generate_series(1, 20000) g")  # fmt: skip


def test_the_bytes_of_a_large_table_read_here_count_in_the_progress(pg: PgServer, tmp_path: Path):
    """A large table split over COPY sessions, its rows read out of the archive by the module itself (pg_restore
    reads none of them): while its first row waits in the gate, the progress counts the bytes read ahead."""
    gate = sql.Identifier(GATE_ROLE)
    pg.sql(sql.SQL("CREATE ROLE {}").format(gate))  # open while the source and the live database are made
    pg.sql("CREATE DATABASE gate_big_source")
    pg.sql("CREATE DATABASE gate_big")
    progress_dir = tmp_path / "progress"
    run: threading.Thread | None = None
    try:  # 20 000 rows of 1 kB that hardly compress: about 11 MB of dump, read ahead by far less than all
        pg.sql(GATE_SQL.replace("(x integer CHECK", "(pad text, x integer CHECK").replace("VALUES (1)", BIG_ROWS),
               dbname="gate_big_source")  # fmt: skip
        dump = make_dump(pg, "gate_big_source", "custom", tmp_path / "gate_big.dump")
        subprocess.run([str(client_bindir() / "pg_restore"), "-d", "gate_big", str(dump)], env=pg.client_env(),
                       check=True)  # fmt: skip
        pg.sql(sql.SQL("DROP ROLE {}").format(gate))  # closed: the COPY sessions wait at their first row
        req = RestoreRequest(db="gate_big", src=str(dump), bindir=str(client_bindir()), jobs=2, parallel_table_mb=1,
                             progress_dir=str(progress_dir), force=True)  # fmt: skip
        done: list = []
        run = threading.Thread(target=lambda: done.append(restore_database(pg.params(), req)), daemon=True)
        run.start()
        deadline = time.monotonic() + 60
        while (read_progress(str(progress_dir), "gate_big") or {}).get("bytes_done", 0) < 2 << 20:
            assert run.is_alive() and time.monotonic() < deadline, read_progress(str(progress_dir), "gate_big")
            time.sleep(0.1)
        held = read_progress(str(progress_dir), "gate_big")
        assert held["state"] == "running" and held["bytes_done"] < held["bytes_total"], held
    finally:
        if run is not None:
            pg.sql(sql.SQL("CREATE ROLE {}").format(gate))  # open the gate
            run.join(timeout=120)
        pg.sql(sql.SQL("DROP ROLE IF EXISTS {}").format(gate))
        for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname ~ '^gate_big'"):
            drop_database(pg, name)
    assert done and done[0].changed
    assert "read from the archive here" in " ".join(done[0].log), done[0].log
    final = read_progress(str(progress_dir), "gate_big")
    assert final["state"] == "done" and final["bytes_done"] == final["bytes_total"]
