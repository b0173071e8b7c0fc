"""Measure pgops.dbrestore against the raw tools and community.postgresql on a real PostgreSQL.

    python bench/run.py [--pg N] [--quick] [--out DIR]

Starts a throw-away server (embedded PostgreSQL 18 by default, any major 10-18 with --pg),
builds pgbench databases, runs the four scenarios of bench/README.md, prints Markdown tables
with the targets' verdicts and writes results.json, results.md and scaling.png to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / ".cache" / "collections")]

import psycopg  # noqa: E402
from methods import (  # noqa: E402
    DROP_METHODS,
    JOBS,
    RESTORE_METHODS,
    Failed,
    ansible_floor,
    drop_reliably,
    dump_pipe_restore,
    pg_restore,
    refresh_from_server,
    rerun_full_hash,
    rerun_identity,
    rerun_via_role,
    restore_swap,
    restore_swap_pooled,
    restore_swap_progress,
    restore_via_ansible,
)
from psycopg import sql  # noqa: E402
from report import markdown, plot, raw_method  # noqa: E402

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError  # noqa: E402
from tests.harness.pg import PgServer, client_bindir, start_server  # noqa: E402
from tests.harness.pgbouncer import BINARY as PGBOUNCER  # noqa: E402
from tests.harness.pgbouncer import PgBouncer, Probe  # noqa: E402
from tests.harness.storm import Storm  # noqa: E402

# Fails unless the data are there: the app's view of "the database is up".
PROBE = "SELECT 1 / count(*) FROM pgbench_accounts WHERE aid = 1"
DROP_DB = "bench_drop"


@dataclass(frozen=True)
class Plan:
    scales: tuple[int, ...]
    drop_clients: tuple[int, ...] = (20, 60)
    drop_trials: int = 20
    outage_trials: int = 3
    wall_trials: int = 3
    rerun_trials: int = 3
    probes: int = 4
    pooled_trials: int = 5
    pooled_clients: int = 20
    progress_pairs: int = 5  # interleaved (swap, swap with progress) pairs per size
    big_dump_mb: int = 1100  # the dump of the rerun-at-any-size bench (incompressible rows, uncompressed dump)
    big_trials: int = 5
    many_tables: int = 400  # the many-tables database: this many tables of 20 000 rows, each with an index


FULL = Plan(scales=(1, 10, 50), wall_trials=5, many_tables=400)
QUICK = Plan(scales=(1,), drop_trials=2, outage_trials=1, wall_trials=1, rerun_trials=1, pooled_trials=1,
             progress_pairs=1, big_dump_mb=24, big_trials=2, many_tables=20)  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# what a run's result contributes to the bench's rows
KEPT = ("changed", "switch_window_ms", "phases_ms", "pgbouncer_pause_ms", "pgbouncer_window_ms", "switched_at")


def timed(fn: Callable[..., dict | None], *args: object, settle: str | None = None) -> dict:
    """Run one operation: its seconds, or the failure a user would see (never both).

    settle: the database it restored, vacuumed and analyzed untimed right after, as autovacuum would do a few
    seconds later: during the next trial, whichever method that is.
    """
    t = time.monotonic()
    try:
        out = fn(*args) or {}
    except (psycopg.Error, PgOpsError, Failed) as exc:
        return {"ok": False, "s": time.monotonic() - t, "error": " ".join(str(exc).split())}
    s = time.monotonic() - t
    if args and isinstance(args[0], PgServer):
        args[0].pruned()  # untimed: the old copy our restore left to a background drop is gone before the next trial
        if settle:
            args[0].sql("VACUUM (ANALYZE)", dbname=settle)
    keep = {k: out[k] for k in KEPT if k in out}
    return {"ok": True, "s": s, **keep}


def conninfo(pg: PgServer, db: str) -> dict:
    env = pg.client_env()
    return dict(host="127.0.0.1", port=pg.port, dbname=db, user=env["PGUSER"], password=env["PGPASSWORD"])


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench setup: timed out waiting for {what}")
        time.sleep(0.02)


# --- scenario 1 ----------------------------------------------------------------------------------


def bench_drops(pg: PgServer, plan: Plan) -> list[dict]:
    rows: list[dict] = []
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DROP_DB))
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
    for clients in plan.drop_clients:
        # one storm per client count: it keeps knocking while the database is gone between trials
        with Storm(conninfo(pg, DROP_DB), clients=clients, interval=0.01, name="app"):
            for method, fn in DROP_METHODS.items():
                if "FORCE" in method and pg.major < 13:
                    rows.append({"clients": clients, "method": method, "ok": False, "skipped": "needs PostgreSQL 13+"})
                    continue
                for trial in range(plan.drop_trials):
                    pg.sql(create)
                    wait_until(lambda: pg.sql(sessions, (DROP_DB,))[0][0] >= clients, 60, f"{clients} sessions")  # noqa: B023
                    r = timed(fn, pg, DROP_DB)
                    drop_reliably(pg, DROP_DB)
                    rows.append({"clients": clients, "method": method, "trial": trial, **r})
                ok = sum(r["ok"] for r in rows[-plan.drop_trials :])
                log(f"drop, {clients} clients, {method}: {ok}/{plan.drop_trials} succeeded")
    return rows


# --- scenarios 2-4 -------------------------------------------------------------------------------


def data_ok(pg: PgServer, db: str) -> bool:
    try:
        pg.sql(PROBE, dbname=db)
        return True
    except psycopg.Error:
        return False


def ensure_loaded(pg: PgServer, db: str, dump: Path) -> None:
    """Put the dump back (untimed) when a failed trial left the database missing or empty."""
    if not data_ok(pg, db):
        drop_reliably(pg, db)
        pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        pg_restore(pg, db, dump, JOBS)


def outage_trial(pg: PgServer, db: str, dump: Path, fn: Callable[..., dict], probes: int) -> dict:
    ensure_loaded(pg, db, dump)
    with Storm(conninfo(pg, db), clients=probes, interval=0.01, query=PROBE, name="probe") as storm:
        wait_until(lambda: all(s.queries for s in storm.stats), 30, "probes")
        time.sleep(0.2)
        r = timed(fn, pg, db, dump)
        end = time.monotonic()
        # a gap still open when the operation returns counts too: wait for every probe to get through
        try:
            wait_until(lambda: all(s.last_ok > end for s in storm.stats), 60 if r["ok"] else 10, "probes back")
        except RuntimeError:
            if r["ok"]:
                r.update(ok=False, error="the app could not query the restored database within 60 s")
        now = time.monotonic()
        r["outage_s"] = max(max(s.longest_gap, now - s.last_ok if s.last_ok <= end else 0) for s in storm.stats)
    return r


def bench_size(pg: PgServer, plan: Plan, scale: int, work: Path) -> dict:
    db = f"bench_s{scale}"
    env = pg.client_env()
    log(f"pgbench -i -s {scale} into {db}")
    pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    subprocess.run([str(client_bindir() / "pgbench"), "-i", "-q", "-s", str(scale), db], env=env, check=True,
                   capture_output=True)  # fmt: skip
    mb = pg.sql("SELECT pg_database_size(%s) / 1048576", (db,))[0][0]
    dump = work / f"{db}.pgc"  # the extension tells postgresql_db it is a custom-format archive
    subprocess.run([str(client_bindir() / "pg_dump"), "-Fc", "-f", str(dump), db], env=env, check=True)
    if pg.major < 17:
        subprocess.run([str(client_bindir() / "pg_dump"), "-f", str(dump.with_suffix(".sql")), db], env=env,
                       check=True)  # fmt: skip
    size: dict = {"scale": scale, "mb": int(mb), "dump_mb": round(dump.stat().st_size / 2**20, 1)}

    walls = []
    for _trial in range(plan.wall_trials):
        for jobs in dict.fromkeys((1, JOBS)):
            fresh = f"{db}_fresh"
            drop_reliably(pg, fresh)
            walls.append({"method": raw_method(jobs), **timed(createdb_and_pg_restore, pg, fresh, dump, jobs)})
            drop_reliably(pg, fresh)
        ensure_loaded(pg, db, dump)
        walls.append({"method": "pg_restore_db swap", **timed(restore_swap, pg, db, dump, settle=db)})
    size["walls"] = walls
    log(f"s={scale}: wall times done")

    pairs = []
    for trial in range(plan.progress_pairs):  # interleaved, so drift of the machine hits both alike
        ensure_loaded(pg, db, dump)
        pairs.append({"method": "swap", "trial": trial, **timed(restore_swap, pg, db, dump, settle=db)})
        ensure_loaded(pg, db, dump)
        pairs.append({"method": "swap + progress", "trial": trial,
                      **timed(restore_swap_progress, pg, db, dump, settle=db)})  # fmt: skip
    size["progress"] = pairs
    log(f"s={scale}: progress overhead done")

    # the last swap left the dump's marker in db: from here on a run without force has nothing to do
    size["reruns"] = [timed(restore_swap, pg, db, dump, False) for _trial in range(plan.rerun_trials)]
    size["ansible_rerun"] = timed(restore_via_ansible, pg, db, dump)
    log(f"s={scale}: idempotent reruns done")

    rows = []
    for trial in range(plan.outage_trials):
        for method, fn in RESTORE_METHODS.items():
            r = outage_trial(pg, db, dump, fn, plan.probes)
            rows.append({"method": method, "trial": trial, **r})
            state = f"outage {r['outage_s']:.2f} s" if r["ok"] else f"FAILED ({r['error'][:80]})"
            log(f"s={scale} trial {trial}: {method}: {r['s']:.1f} s, {state}")
    size["outage"] = rows
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{db}%",)):
        drop_reliably(pg, name)  # frees the disk for the next size (previous copies included)
    return size


def createdb_and_pg_restore(pg: PgServer, db: str, dump: Path, jobs: int = JOBS) -> dict:
    """Raw: createdb + pg_restore -jN into a new database, as a script does it."""
    pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    pg_restore(pg, db, dump, jobs)
    return {}


def bench_many_tables(pg: PgServer, plan: Plan, work: Path) -> dict:
    """Wall time on a database of many mid-sized tables (no table to split): raw createdb + pg_restore -jN
    against the swap, in interleaved pairs."""
    db = "bench_many"
    log(f"building {plan.many_tables} tables in {db}")
    pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    for i in range(plan.many_tables):
        pg.sql(f"CREATE TABLE t{i} AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g; "
               f"CREATE INDEX ON t{i} (v)", dbname=db)  # fmt: skip
    mb = pg.sql("SELECT pg_database_size(%s) / 1048576", (db,))[0][0]
    dump = work / f"{db}.pgc"
    subprocess.run([str(client_bindir() / "pg_dump"), "-Fc", "-f", str(dump), db], env=pg.client_env(), check=True)
    walls = []
    for trial in range(plan.wall_trials):
        fresh = f"{db}_fresh"
        drop_reliably(pg, fresh)
        walls.append({"method": raw_method(JOBS), "trial": trial,
                      **timed(createdb_and_pg_restore, pg, fresh, dump)})  # fmt: skip
        drop_reliably(pg, fresh)
        walls.append({"method": "pg_restore_db swap", "trial": trial, **timed(restore_swap, pg, db, dump, settle=db)})
    log(f"{plan.many_tables} tables: wall times done")
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{db}%",)):
        drop_reliably(pg, name)
    return {"tables": plan.many_tables, "mb": int(mb), "walls": walls}


def bench_big_rerun(pg: PgServer, plan: Plan, work: Path) -> dict:
    """A no-op rerun of a large dump: by the file's identity (reads nothing) against a full hash, and through
    ansible-playbook; the dump is uncompressed incompressible rows of about plan.big_dump_mb MB."""
    db = "bench_big"
    env = pg.client_env()
    rows = plan.big_dump_mb * 1000  # ~1 kB a row
    log(f"building a {plan.big_dump_mb} MB dump in {db}")
    pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    pg.sql("CREATE TABLE blob (id int PRIMARY KEY, payload text)", dbname=db)
    pg.sql("INSERT INTO blob SELECT g, (SELECT string_agg(md5(g::text || ':' || k), '') FROM generate_series(1, 32) k) "
           "FROM generate_series(1, %s) g", (rows,), dbname=db)  # fmt: skip
    dump = work / f"{db}.pgc"
    subprocess.run([str(client_bindir() / "pg_dump"), "-Fc", "-Z0", "-f", str(dump), db], env=env, check=True)
    out: dict = {"dump_mb": round(dump.stat().st_size / 2**20, 1)}
    out["first"] = timed(restore_swap, pg, db, dump)  # records the dump with its identity
    out["identity"] = [timed(rerun_identity, pg, db, dump) for _trial in range(plan.big_trials)]
    out["full_hash"] = [timed(rerun_full_hash, pg, db, dump) for _trial in range(plan.big_trials)]
    out["ansible"], out["ansible_floor"] = [], []
    for _trial in range(plan.big_trials):  # interleaved with an empty playbook: Ansible's own start-up here
        out["ansible"].append(timed(rerun_via_role, pg, db, dump))
        out["ansible_floor"].append(timed(ansible_floor, pg, db, dump))
    log(f"big dump ({out['dump_mb']} MB): reruns done")
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{db}%",)):
        drop_reliably(pg, name)
    dump.unlink()
    return out


# --- scenario 9: behind PgBouncer ---------------------------------------------------------------

POOLED_DB = "bench_pooled"
POOLED_METHODS = ("swap with pgbouncers (PAUSE/RESUME)", "swap without pgbouncers")


def bench_pgbouncer(pg: PgServer, plan: Plan, work: Path) -> list[dict]:
    """20 clients query through PgBouncer (transaction pooling) every 10 ms while a swap switches the database:
    failed queries and the longest query, with and without pgbouncers."""
    env = pg.client_env()
    pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(POOLED_DB)))
    subprocess.run([str(client_bindir() / "pgbench"), "-i", "-q", "-s", "1", POOLED_DB], env=env, check=True,
                   capture_output=True)  # fmt: skip
    dump = work / f"{POOLED_DB}.pgc"
    subprocess.run([str(client_bindir() / "pg_dump"), "-Fc", "-f", str(dump), POOLED_DB], env=env, check=True)
    bouncer = PgBouncer(pg).start()
    rows: list[dict] = []
    try:
        for trial in range(plan.pooled_trials):
            for method in POOLED_METHODS:
                targets = [bouncer.target()] if "with " in method else []
                with Probe(bouncer.conninfo(POOLED_DB), PROBE, clients=plan.pooled_clients) as probe:
                    probe.wait_all_read(1)
                    r = timed(restore_swap_pooled, pg, POOLED_DB, dump, targets)
                    try:
                        probe.wait_all_read(1, timeout=60)
                    except TimeoutError:
                        r.update(ok=False, error="the clients could not query the restored database within 60 s")
                # the switch: from PAUSE (or the close, without pgbouncers) to a second after the renames
                window = (r.get("pgbouncer_pause_ms") or r.get("switch_window_ms") or 0) / 1000
                at = r.get("switched_at") or 0
                seen = {"failed_queries": probe.failed, "queries": probe.queries, "longest_ms": round(probe.longest_ms),
                        "switch_longest_ms": round(probe.longest_between(at - window - 0.05, at + 1)) if at else None,
                        "first_error": (probe.errors or [""])[0]}  # fmt: skip
                rows.append({"method": method, "trial": trial, **seen, **r})
                log(f"pgbouncer trial {trial}: {method}: {probe.failed} failed of {probe.queries} queries, longest "
                    f"{probe.longest_ms:.0f} ms ({seen['switch_longest_ms']} ms in the switch), PgBouncer paused "
                    f"{r.get('pgbouncer_window_ms') or '-'}")  # fmt: skip
    finally:
        bouncer.stop()
        for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{POOLED_DB}%",)):
            drop_reliably(pg, name)
    return rows


def bench_refresh(pg: PgServer, source: PgServer, plan: Plan, scale: int) -> dict:
    """Scenario 10: a database refreshed from another server, by pg_restore_db source= and by a pipe by hand."""
    db = f"refresh_s{scale}"
    log(f"pgbench -i -s {scale} into {db} on the source server")
    source.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    subprocess.run([str(client_bindir() / "pgbench"), "-i", "-q", "-s", str(scale), db], env=source.client_env(),
                   check=True, capture_output=True)  # fmt: skip
    mb = source.sql("SELECT pg_database_size(%s) / 1048576", (db,))[0][0]
    pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))  # the live database to refresh
    rows = []
    for _trial in range(plan.wall_trials):
        fresh = f"{db}_by_hand"
        drop_reliably(pg, fresh)
        pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(fresh)))
        rows.append({"method": "pg_dump | pg_restore", **timed(dump_pipe_restore, pg, fresh, source, db)})
        drop_reliably(pg, fresh)
        rows.append({"method": "pg_restore_db source=", **timed(refresh_from_server, pg, db, source, db)})
        log(f"refresh s={scale}: " + ", ".join(f"{r['method']} {r['s']:.1f} s" for r in rows[-2:]))
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{db}%",)):
        drop_reliably(pg, name)
    drop_reliably(source, db)
    return {"scale": scale, "mb": int(mb), "refresh": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg", type=int, default=18, choices=range(10, 19), metavar="N", help="PostgreSQL major 10-18")
    ap.add_argument("--quick", action="store_true", help="smoke run: pgbench -s 1, few trials (< 3 minutes)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="output directory (default bench/out)")
    ap.add_argument("--from-json", type=Path, metavar="FILE", help="only redo tables and plot from a results.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        write_outputs(json.loads(args.from_json.read_text()), args.out)
        return
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    notes = [
        f"restores use {JOBS} jobs (CPU count) where the tool allows it; community.postgresql's postgresql_db "
        "runs pg_restore without -j and its wall time includes ansible-playbook",
    ]
    if args.pg < 17:
        notes.append(
            f"PostgreSQL {args.pg} < 17: pg_restore 18 output is piped to psql without SET transaction_timeout "
            "(pg_restore_db, one job, no -j); raw pg_restore skips that statement with an error; "
            "postgresql_db restores a plain .sql dump of the same data"
        )
    if args.pg < 13:
        notes.append("DROP DATABASE … WITH (FORCE) needs PostgreSQL 13+: not measured")
    log(f"starting PostgreSQL {args.pg}")
    pg = start_server(args.pg)
    try:
        work = pg.base / "bench"
        work.mkdir()
        res: dict = {"meta": {}, "plan": asdict(plan)}
        res["drops"] = bench_drops(pg, plan)
        res["sizes"] = [bench_size(pg, plan, scale, work) for scale in plan.scales]
        if os.access(PGBOUNCER, os.X_OK):
            res["pgbouncer"] = bench_pgbouncer(pg, plan, work)
        else:
            notes.append(f"{PGBOUNCER} is missing (apt-get install pgbouncer): the PgBouncer scenario did not run")
        res["many_tables"] = bench_many_tables(pg, plan, work)
        res["big_rerun"] = bench_big_rerun(pg, plan, work)
        version = pg.sql("SHOW server_version")[0][0]
        log(f"starting a second PostgreSQL {args.pg}, the source server of scenario 10")
        source = start_server(args.pg)
        try:
            res["refresh"] = [bench_refresh(pg, source, plan, scale) for scale in plan.scales]
        finally:
            source.destroy()
    finally:
        pg.destroy()
    client = subprocess.run(
        [str(client_bindir() / "pg_restore"), "--version"], capture_output=True, text=True, check=False
    )
    res["meta"] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "server_version": version,
        "client_version": client.stdout.split()[-1],
        "pg_major": args.pg,
        "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "python": f"Python {platform.python_version()}",
        "jobs": JOBS,
        "quick": args.quick,
        "runtime_s": time.monotonic() - started,
        "drop_trials": plan.drop_trials,
        "outage_trials": plan.outage_trials,
        "wall_trials": plan.wall_trials,
        "probes": plan.probes,
        "pooled_trials": plan.pooled_trials,
        "pooled_clients": plan.pooled_clients,
        "notes": notes,
    }
    write_outputs(res, args.out)


def write_outputs(res: dict, out: Path) -> None:
    text = markdown(res)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(text)
    plot(res, out / "scaling.png")
    print(text)
    log(f"wrote {out}/results.json, results.md, scaling.png (run took {res['meta']['runtime_s']:.0f} s)")


if __name__ == "__main__":
    main()
