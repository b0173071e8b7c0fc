"""roles/restore/files/pgops-restore, the web-triggered restore, run in a fresh interpreter as sudo would.

What the web app (through sudo) and whoever writes the backup directory can hand it: the command
only restores a real dump lying in the backup directory, and answers every request, including
every failure, with one JSON line and a documented exit code, never a traceback.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import drop_database
from tests.harness.pg import PgServer, client_bindir
from tests.integration.conftest import fingerprint_db

ROOT = Path(__file__).resolve().parents[2]
TRIGGER = ROOT / "roles" / "restore" / "files" / "pgops-restore"
EXIT_OK, EXIT_REFUSED, EXIT_FAILED, EXIT_BUSY, EXIT_SETUP = 0, 2, 3, 4, 5
# The library's advisory lock class ("pgop"): a restore of a database holds (LOCK_CLASS, hashtext(db)).
LOCK_CLASS = 0x70676F70
# Loads the command as a module with another config path, then runs it as its __main__ would.
RUNNER = """
import importlib.machinery, importlib.util, sys
loader = importlib.machinery.SourceFileLoader("pgops_restore", sys.argv[1])
module = importlib.util.module_from_spec(importlib.util.spec_from_loader("pgops_restore", loader))
loader.exec_module(module)
module.CONFIG = sys.argv[2]
module.main(sys.argv[3:])
"""
pytestmark = pytest.mark.newest_major

ME = pwd.getpwuid(os.geteuid()).pw_name
GOOD = "hoge_db.2026-11-24.dump"
GOOD_DIR = "hoge_db.2026-11-20.d"
# Newer than GOOD, all of them real dumps or leading to one, none of them usable.
UNUSABLE = {
    "hoge_db.2026-11-25.dump": "a link out of the backup directory (absolute)",
    "hoge_db.2026-11-26.dump": "a link out of the backup directory (relative)",
    "hoge_db.2026-11-27.dump": "a dangling link",
    "hoge_db.2026-11-28.dump.sha256": "a checksum file",
    "hoge_db.2026-11-28.dump.md5": "a checksum file",
    "hoge_db.2026-11-28.dump.tmp": "a temporary file",
    "hoge_db.2026-11-28.dump.partial": "a partial file",
    "hoge_db.2026-11-29.dump": "a link to a partial file",
    "hoge_db.2026-11-30.fifo": "a FIFO",
    "hoge_db.2026-12-01.d": "a directory that is not a pg_dump directory",
    "hoge_db.2026-12-02.dump": "a link into a subdirectory",
    "hoge_db.2026-12-03.d": "a pg_dump directory whose toc.dat links out",
    "shard_a.2026-12-04.dump": "another database's dump",
    "hoge_db.2026-12-06.dump.part": "a name the configuration excludes",
}


def trigger(config: Path, *argv: str) -> tuple[int, dict]:
    """Run the command; it must print exactly one JSON line and nothing on stderr."""
    proc = subprocess.run(
        [sys.executable, "-I", "-c", RUNNER, str(TRIGGER), str(config), *argv],
        capture_output=True, text=True, timeout=600, check=False, cwd="/",
    )  # fmt: skip
    assert proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    answer = json.loads(lines[0])
    assert answer["ok"] is (proc.returncode == EXIT_OK), answer
    assert proc.returncode == EXIT_OK or answer["error"], answer
    return proc.returncode, answer


def write_config(path: Path, pg: PgServer, backups: Path, **changes) -> Path:
    config = {
        "runas": ME,
        "allowed_dbs": ["hoge_db", "shard_a", "hoge_junk"],
        "backup_dir": str(backups),
        "dump_pattern": "*{db}.*",  # also matches hidden names, which must still be skipped
        "dump_excludes": ["*.part"],
        "libdir": str(ROOT / ".cache" / "collections"),
        "connection": pg.module_args(),
        "options": {"bindir": str(client_bindir()), "keep_previous": 1},
        **changes,
    }
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return path


@pytest.fixture
def world(pg: PgServer, dumps, tmp_path: Path):
    """hoge_db (chinook without invoice lines) and a backup directory full of things that are not its dump."""
    pg.sql("CREATE DATABASE hoge_db TEMPLATE chinook_source")
    pg.sql("DELETE FROM invoice_line", dbname="hoge_db")
    backups, outside = tmp_path / "backups", tmp_path / "outside"
    backups.mkdir()
    outside.mkdir()
    (backups / "sub").mkdir()
    custom = dumps["chinook"]["custom"]
    shutil.copy(custom, backups / GOOD)
    shutil.copytree(dumps["chinook"]["directory"], backups / GOOD_DIR)
    shutil.copy(custom, outside / "secret.dump")
    shutil.copy(custom, backups / "sub" / "hoge_db.x.dump")
    (backups / "hoge_db.2026-11-25.dump").symlink_to(outside / "secret.dump")
    (backups / "hoge_db.2026-11-26.dump").symlink_to("../outside/secret.dump")
    (backups / "hoge_db.2026-11-27.dump").symlink_to("hoge_db.missing.dump")
    for suffix in (".sha256", ".md5", ".tmp", ".partial"):
        shutil.copy(custom, backups / f"hoge_db.2026-11-28.dump{suffix}")
    (backups / "hoge_db.2026-11-29.dump").symlink_to("hoge_db.2026-11-28.dump.partial")
    os.mkfifo(backups / "hoge_db.2026-11-30.fifo")
    (backups / "hoge_db.2026-12-01.d").mkdir()
    shutil.copytree(dumps["chinook"]["directory"], outside / "dir.d")
    (backups / "hoge_db.2026-12-03.d").mkdir()
    (backups / "hoge_db.2026-12-03.d" / "toc.dat").symlink_to(outside / "dir.d" / "toc.dat")
    (backups / "hoge_db.2026-12-02.dump").symlink_to("sub/hoge_db.x.dump")
    shutil.copy(custom, backups / "shard_a.2026-12-04.dump")
    shutil.copy(custom, backups / ".hoge_db.2026-12-05.dump")  # hidden
    shutil.copy(custom, backups / "hoge_db.2026-12-06.dump.part")
    # a database with no usable dump at all
    (backups / "hoge_junk.1.dump").symlink_to(outside / "secret.dump")
    shutil.copy(custom, backups / "hoge_junk.2.dump.partial")
    old = time.time() - 3600
    os.utime(backups / GOOD, (old, old))
    os.utime(backups / GOOD_DIR, (old - 60, old - 60))
    yield backups
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE 'hoge_db%'"):
        drop_database(pg, name)


def test_default_choice_is_the_newest_usable_dump(pg: PgServer, world: Path, tmp_path: Path):
    config = write_config(tmp_path / "pgops-restore.json", pg, world)
    code, answer = trigger(config, "hoge_db")
    assert code == EXIT_OK, answer
    assert answer["dump"] == GOOD and answer["changed"] is True
    assert answer["previous_db"].startswith("hoge_db_prev_")
    assert fingerprint_db(pg, "hoge_db") == fingerprint_db(pg, "chinook_source")


def test_named_dump_must_be_one_of_the_databases_usable_dumps(pg: PgServer, world: Path, tmp_path: Path):
    config = write_config(tmp_path / "pgops-restore.json", pg, world)
    before = fingerprint_db(pg, "hoge_db")
    for name, what in [*UNUSABLE.items(), (".hoge_db.2026-12-05.dump", "a hidden file"), ("sub", "a directory")]:
        code, answer = trigger(config, "hoge_db", name)
        assert code == EXIT_REFUSED, (what, answer)
    # a database whose directory entries are all unusable: refused, nothing to restore
    code, answer = trigger(config, "hoge_junk")
    assert code == EXIT_REFUSED and "no usable dump of 'hoge_junk'" in answer["error"], answer
    assert fingerprint_db(pg, "hoge_db") == before

    code, answer = trigger(config, "hoge_db", GOOD_DIR)  # a pg_dump directory is a dump
    assert code == EXIT_OK and answer["dump"] == GOOD_DIR and answer["changed"], answer
    assert fingerprint_db(pg, "hoge_db") == fingerprint_db(pg, "chinook_source")


def test_refuses_to_run_as_another_user_than_configured(pg: PgServer, world: Path, tmp_path: Path):
    config = write_config(tmp_path / "pgops-restore.json", pg, world, runas="pgops-nobody")
    code, answer = trigger(config, "hoge_db")
    assert code == EXIT_SETUP, answer
    assert f"runs as pgops-nobody, not as {ME}: sudo -n -u pgops-nobody " in answer["error"]


def test_busy_when_another_restore_holds_the_database(pg: PgServer, world: Path, tmp_path: Path):
    config = write_config(tmp_path / "pgops-restore.json", pg, world)
    before = fingerprint_db(pg, "hoge_db")
    with pg.connect() as holder:  # a superuser session, as another restore of hoge_db would hold it
        holder.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, "hoge_db"))
        code, answer = trigger(config, "hoge_db")
    assert code == EXIT_BUSY, answer
    assert answer["sqlstate"] == "55P03" and answer["dump"] == GOOD
    assert fingerprint_db(pg, "hoge_db") == before


@pytest.mark.parametrize(
    ("case", "code", "expect"),
    [
        ("config missing", EXIT_SETUP, "cannot read"),
        ("config not JSON", EXIT_SETUP, "cannot read"),
        ("config a list", EXIT_SETUP, "is not a valid configuration"),
        ("config without backup_dir", EXIT_SETUP, "check backup_dir"),
        ("backup directory missing", EXIT_SETUP, "cannot read the backup directory"),
        ("no library in libdir", EXIT_SETUP, "cannot set up the restore"),
        ("option the library does not know", EXIT_SETUP, "cannot set up the restore"),
        ("server not listening", EXIT_FAILED, ""),
    ],
)
def test_every_failure_is_one_json_line(pg: PgServer, world: Path, tmp_path: Path, case: str, code: int, expect: str):
    path = tmp_path / "pgops-restore.json"
    if case == "config missing":
        config = tmp_path / "absent.json"
    elif case == "config not JSON":
        config = path
        path.write_text("{not json")
    elif case == "config a list":
        config = path
        path.write_text("[]")
    else:
        changes = {
            "config without backup_dir": {"backup_dir": None},
            "backup directory missing": {"backup_dir": str(tmp_path / "nowhere")},
            "no library in libdir": {"libdir": str(tmp_path)},
            "option the library does not know": {"options": {"no_such_option": 1}},
            "server not listening": {"connection": pg.module_args(login_port=1, connect_timeout=2)},
        }[case]
        config = write_config(path, pg, world, **changes)
    before = fingerprint_db(pg, "hoge_db")
    got, answer = trigger(config, "hoge_db")
    assert got == code, answer
    assert expect in answer["error"]
    if case == "server not listening":  # a failed restore says which dump it tried
        assert answer["dump"] == GOOD
    assert fingerprint_db(pg, "hoge_db") == before


# --- start and status: the restore in a job of its own, outliving its caller ---------------------


def status_until(config: Path, db: str, states: tuple[str, ...], phase: str = "", deadline_s: float = 60) -> dict:
    """Ask `status` until the job's state is one of states, in that progress phase (or fail at the deadline)."""
    deadline = time.monotonic() + deadline_s
    while True:
        code, answer = trigger(config, "status", db)
        assert code == EXIT_OK, answer
        if answer["state"] in states and (not phase or (answer["progress"] or {}).get("phase") == phase):
            return answer
        assert time.monotonic() < deadline, f"still {answer['state']} after {deadline_s} s: {answer}"
        time.sleep(0.2)


def waiting_for_the_lock(pg: PgServer, deadline_s: float = 30) -> None:
    """Until a restore polls for the restore lock the test holds (registry.acquire_lock: try, look at the holders)."""
    deadline = time.monotonic() + deadline_s
    query = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgops.dbrestore' "
             "AND (query LIKE '%%pg_try_advisory_lock%%' OR query LIKE '%%pg_locks%%')")  # fmt: skip
    while pg.sql(query)[0][0] == 0:
        assert time.monotonic() < deadline, "no restore waits for the lock"
        time.sleep(0.1)


def start_as_a_web_worker(config: Path, db: str) -> tuple[subprocess.Popen, dict]:
    """A caller in a session of its own that runs `start`, then lives on until it is killed (a web worker)."""
    script = RUNNER.replace("module.main(sys.argv[3:])", "try:\n    module.main(sys.argv[3:])\nfinally:\n"
                            "    sys.stdout.flush()\n    import time; time.sleep(600)")  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-I", "-c", script, str(TRIGGER), str(config), "start", db],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd="/",
    )  # fmt: skip
    line = worker.stdout.readline()
    return worker, json.loads(line)


def test_start_answers_at_once_and_the_job_outlives_its_caller(pg: PgServer, world: Path, tmp_path: Path):
    state = tmp_path / "state"
    config = write_config(tmp_path / "pgops-restore.json", pg, world, state_dir=str(state), check_space=True,
                          options={"bindir": str(client_bindir()), "keep_previous": 1, "lock_timeout": 60})  # fmt: skip
    code, answer = trigger(config, "status", "hoge_db")
    assert code == EXIT_OK and answer["state"] == "none" and answer["job"] is None, answer
    with pg.connect() as holder:  # another restore of hoge_db holds its lock: the job must wait for it
        holder.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, "hoge_db"))
        began = time.monotonic()
        worker, started = start_as_a_web_worker(config, "hoge_db")
        assert time.monotonic() - began < 10, "start waited for the restore"
        assert started["ok"] and started["state"] == "queued" and started["dump"] == GOOD, started
        job = started["job"]
        # the job runs in a session of its own (not its leader: it can never get a terminal), not in its caller's
        assert os.getsid(started["pid"]) not in (os.getsid(worker.pid), started["pid"], os.getsid(0))
        waiting_for_the_lock(pg)
        running = status_until(config, "hoge_db", ("running",))
        # no progress of its own before it holds the lock (the file may still hold an earlier run's)
        assert running["job"] == job and running["progress"] is None, running

        code, busy = trigger(config, "start", "hoge_db", GOOD_DIR)  # one job per database
        assert code == EXIT_BUSY and "busy" in busy["error"], busy
        assert busy["running"]["job"] == job, busy

        os.killpg(worker.pid, 9)  # the web worker dies (request timeout) while its restore waits
        worker.wait(timeout=10)
        worker.stdout.close()
        worker.stderr.close()
        assert status_until(config, "hoge_db", ("running",))["job"] == job
        waiting_for_the_lock(pg)  # the job still waits, its caller gone
    done = status_until(config, "hoge_db", ("done", "failed"))
    assert done["state"] == "done" and done["job"] == job, done
    assert done["outcome"]["changed"] is True and done["outcome"]["previous_db"].startswith("hoge_db_prev_"), done
    assert done["progress"]["phase"] == "done" and done["progress"]["percent"] == 100, done
    assert done["started_at"] >= done["queued_at"] and done["finished_at"] >= done["started_at"], done
    assert fingerprint_db(pg, "hoge_db") == fingerprint_db(pg, "chinook_source")

    # the app changes its data; the same dump again (a reset button) restores it again
    pg.sql("DELETE FROM invoice_line", dbname="hoge_db")
    code, again = trigger(config, "start", "hoge_db", GOOD)
    assert code == EXIT_OK and again["job"] != job, again
    done = status_until(config, "hoge_db", ("done", "failed"))
    assert done["state"] == "done" and done["job"] == again["job"] and done["outcome"]["changed"] is True, done
    assert fingerprint_db(pg, "hoge_db") == fingerprint_db(pg, "chinook_source")


def test_start_refusals_change_nothing(pg: PgServer, world: Path, tmp_path: Path):
    state = tmp_path / "state"
    config = write_config(tmp_path / "pgops-restore.json", pg, world, state_dir=str(state))
    before = fingerprint_db(pg, "hoge_db")
    refused = [
        ("start", "postgres"),  # not allowed
        ("start", "other_db"),
        ("status", "postgres"),
        ("start", "--force", "hoge_db"),  # option-like
        ("start", "hoge_db", "--no-owner"),
        ("status", "hoge_db", GOOD),
        ("start", "hoge_db", "hoge_db.2026-11-25.dump"),  # a link out of the directory
        ("start", "hoge_db", "hoge_db.2026-11-26.dump"),
        ("start", "hoge_db", "hoge_db.2026-11-27.dump"),  # a dangling link
        ("start", "hoge_db", "../outside/secret.dump"),
        ("start",),
        ("status",),
    ]
    for argv in refused:
        code, answer = trigger(config, *argv)
        assert code == EXIT_REFUSED and answer["error"], (argv, answer)
    jobs = state / "jobs"
    assert not (jobs.exists() and [p for p in jobs.iterdir() if p.suffix == ".json"])
    assert fingerprint_db(pg, "hoge_db") == before
    # without a state_dir there are no jobs: start and status say what to set
    bare = write_config(tmp_path / "bare.json", pg, world)
    code, answer = trigger(bare, "start", "hoge_db")
    assert code == EXIT_SETUP and "restore_web_trigger_state_dir" in answer["error"], answer


def test_a_killed_job_and_too_little_space_are_failures_that_change_nothing(pg: PgServer, world: Path, tmp_path: Path):
    options = {"bindir": str(client_bindir()), "keep_previous": 1, "lock_timeout": 60}
    config = write_config(tmp_path / "pgops-restore.json", pg, world, state_dir=str(tmp_path / "state"),
                          check_space=True, space_margin=1e9, options=options)  # fmt: skip
    before = fingerprint_db(pg, "hoge_db")
    # the role's space check: a live database times space_margin does not fit, the job fails before staging
    code, started = trigger(config, "start", "hoge_db")
    assert code == EXIT_OK, started
    failed = status_until(config, "hoge_db", ("done", "failed"))
    assert failed["state"] == "failed" and failed["sqlstate"] == "53100", failed
    assert "not enough free space for the staging copy" in failed["error"] and "restore_check_space" in failed["error"]

    # a job killed (SIGKILL, no last word) while it waits: status says so, and the next start may run
    config = write_config(tmp_path / "pgops-restore.json", pg, world, state_dir=str(tmp_path / "state"),
                          options=options)  # fmt: skip
    with pg.connect() as holder:
        holder.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, "hoge_db"))
        code, started = trigger(config, "start", "hoge_db")
        assert code == EXIT_OK, started
        waiting_for_the_lock(pg)
        os.kill(started["pid"], 9)
        killed = status_until(config, "hoge_db", ("failed",))
        assert killed["job"] == started["job"] and "ended without a result" in killed["error"], killed
    assert fingerprint_db(pg, "hoge_db") == before
    assert not pg.sql("SELECT datname FROM pg_database WHERE datname LIKE 'hoge_db_%'")
