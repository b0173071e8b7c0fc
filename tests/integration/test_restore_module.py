"""pg_restore_db through ansible-playbook: check/diff mode, idempotency, errors, rollback, revoke_connect."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.copies import name_base
from ansible_collections.pgops.dbrestore.plugins.module_utils.operation import PAUSE_ENV
from tests.harness.ansible_run import PLAYBOOK, ansible_env, run_module
from tests.harness.pg import PgServer, client_bindir
from tests.integration.conftest import fingerprint_db
from tests.integration.test_terminate import allows_connections, can_connect, datacl, roles, storm_for

MODULE = "pgops.dbrestore.pg_restore_db"
pytestmark = pytest.mark.edge_majors
__all__ = ["roles"]  # the fixture, shared with test_terminate.py


def test_playbook_restore_idempotent_and_rollback(pg: PgServer, dumps, live_db: str):
    args = {**pg.module_args(), "db": live_db, "src": str(dumps["chinook"]["custom"]), "bindir": str(client_bindir())}
    before = fingerprint_db(pg, live_db)

    checked = run_module(MODULE, args, check=True, diff=True)
    assert checked["changed"] and not checked.get("failed"), checked.get("msg")
    assert checked["diff"]["before"]["marker"] is None and len(checked["plan"]) == 3 and checked["steps_done"] == []
    assert fingerprint_db(pg, live_db) == before

    done = run_module(MODULE, args, diff=True)
    assert done["changed"] and not done.get("failed"), done.get("msg")
    assert done["format"] == "custom" and done["previous_db"] and done["rollback"] == {"db": live_db, "rollback": True}
    assert done["terminated"] == [] and done["terminated_count"] == 0 and "count" not in done
    assert done["steps_done"] == done["plan"] and done["diff"]["after"]["marker"]["sha256"] == done["sha256"]
    assert "pgops-test-secret" not in json.dumps(done)
    assert fingerprint_db(pg, live_db) == fingerprint_db(pg, "chinook_source") != before

    again = run_module(MODULE, args)
    assert not again["changed"] and again["phases_ms"]["total"] < 2000 and again["steps_done"] == []

    back = run_module(MODULE, {**pg.module_args(), "db": live_db, "rollback": True})
    assert back["changed"] and fingerprint_db(pg, live_db) == before
    none_left = run_module(MODULE, {**pg.module_args(), "db": live_db, "rollback": True})
    assert none_left["failed"] and none_left["msg"].startswith(f'no previous copy of "{live_db}" recorded by')
    assert not none_left["changed"]


def test_playbook_failure_carries_the_partial_result(pg: PgServer, dumps, live_db: str):
    args = {**pg.module_args(), "db": live_db, "src": str(dumps["chinook"]["custom"]), "bindir": str(client_bindir()),
            "verify_query": "SELECT false"}  # fmt: skip
    failed = run_module(MODULE, args)
    assert failed["failed"] and "verify_query returned False on the restored copy" in failed["msg"]
    assert failed["changed"] is False and len(failed["steps_done"]) == 1 and failed["log"]
    assert failed["created"] == [] and allows_connections(pg, live_db)


def test_playbook_errors(pg: PgServer, live_db: str, tmp_path: Path):
    missing = run_module(MODULE, {**pg.module_args(), "db": live_db, "src": str(tmp_path / "nope.dump")})
    assert missing["failed"] and missing["msg"] == f"dump {str(tmp_path / 'nope.dump')!r} does not exist"
    no_src = run_module(MODULE, {**pg.module_args(), "db": live_db})
    assert no_src["failed"] and no_src["msg"] == (
        "src (the dump to restore) or source (a database to stream from) is required unless rollback=true"
    )
    both = run_module(MODULE, {**pg.module_args(), "db": live_db, "rollback": True, "src": "/x"})
    assert both["failed"] and both["msg"].startswith("rollback=true swaps the previous copy back and reads no dump")


def start_module(module: str, args: dict, tmp: Path, env: dict) -> tuple[subprocess.Popen, Path]:
    """run_module, started in the background with extra environment for the module."""
    book, extra, result = tmp / "play.yml", tmp / "vars.json", tmp / "result.json"
    book.write_text(PLAYBOOK.format(module=module))
    extra.write_text(json.dumps({"module_args": args, "result_file": str(result)}))
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
            "-e", f"ansible_python_interpreter={sys.executable}", "-e", f"@{extra}", str(book)]  # fmt: skip
    proc = subprocess.Popen(argv, env={**ansible_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    return proc, result


def wait_paused(proc: subprocess.Popen, pid_file: Path) -> int:
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()):
        assert proc.poll() is None, f"the playbook ended before the pause: {proc.stdout.read()}"
        assert time.monotonic() < deadline, "the module never reached the pause"
        time.sleep(0.01)
    pid = int(pid_file.read_text())
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "the module did not stop"
        time.sleep(0.01)
    return pid


def test_playbook_revoke_connect_shuts_the_app_out_only_for_the_switch(
    pg: PgServer, dumps, live_db: str, roles, tmp_path: Path
):
    """A non-superuser app role: connects before, is refused while the live database is switched, connects
    after exactly as before; the database ACL is the same text as before."""
    app = roles("pgops_shop_app")
    ident = sql.Identifier
    pg.sql(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident(live_db)))
    pg.sql(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(ident(live_db), ident(app)))
    before = datacl(pg, live_db)
    assert can_connect(pg, live_db, app)
    args = {**pg.module_args(), "db": live_db, "src": str(dumps["chinook"]["tar"]), "bindir": str(client_bindir()),
            "block_new_connections": "revoke_connect"}  # fmt: skip
    pid_file = tmp_path / "paused"
    with storm_for(pg, live_db, clients=8, user=app, password="pw") as storm:
        storm.wait_connected()
        since = storm.connects_now()
        proc, result_file = start_module(MODULE, args, tmp_path, {PAUSE_ENV: f"switched:{pid_file}"})
        try:
            pid = wait_paused(proc, pid_file)
            # paused right after the renames: the database the app was using is closed to it
            prev = [d for d in pg.databases() if d.startswith(f"{name_base(live_db)}_prev_")]
            assert len(prev) == 1 and not can_connect(pg, prev[0], app)
            assert allows_connections(pg, prev[0]), "revoke_connect must not touch datallowconn"
            # the workers, reconnecting at once, are refused for want of CONNECT; a connection racing the
            # rename itself is told the name just moved
            denied = "permission denied for database"
            refused = storm.wait_refused(denied)
            others = [e for e in refused if denied not in e and "have just been dropped or renamed" not in e]
            assert not others, others
            os.kill(pid, signal.SIGCONT)
            out = proc.communicate(timeout=300)[0]
        finally:
            if proc.poll() is None:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                proc.kill()
                proc.wait()
        result = json.loads(result_file.read_text())
        assert result["changed"] and not result.get("failed"), result.get("msg") or out
        assert result["terminated_count"] >= 8 and result["previous_db"] == prev[0]
        storm.wait_reconnected(since)
    assert can_connect(pg, live_db, app) and datacl(pg, live_db) == before
    assert fingerprint_db(pg, live_db) == fingerprint_db(pg, "chinook_source")


def test_ansible_doc_renders():
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-doc"), MODULE], env=ansible_env(),
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "[WARNING]" not in proc.stderr, proc.stderr
    for word in ("strategy", "keep_previous", "login_password", "restart_service", "switch_window_ms", "EXAMPLES",
                 "tool_args", "terminated_count", "steps_done"):  # fmt: skip
        assert word in proc.stdout
