"""pg_restore_db through ansible-playbook: check/diff mode, idempotency, errors, rollback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.ansible_run import ansible_env, run_module
from tests.harness.pg import PgServer, client_bindir
from tests.integration.conftest import fingerprint_db

MODULE = "pgops.dbrestore.pg_restore_db"
pytestmark = pytest.mark.edge_majors


def test_playbook_restore_idempotent_and_rollback(pg: PgServer, dumps, live_db: str):
    args = {**pg.module_args(), "db": live_db, "src": str(dumps["chinook"]["custom"]), "bindir": str(client_bindir())}
    before = fingerprint_db(pg, live_db)

    checked = run_module(MODULE, args, check=True, diff=True)
    assert checked["changed"] and not checked.get("failed"), checked.get("msg")
    assert checked["diff"]["before"]["marker"] is None and checked["plan"]
    assert fingerprint_db(pg, live_db) == before

    done = run_module(MODULE, args, diff=True)
    assert done["changed"] and not done.get("failed"), done.get("msg")
    assert done["format"] == "custom" and done["previous_db"] and done["rollback"] == {"db": live_db, "rollback": True}
    assert "pgops-test-secret" not in json.dumps(done)
    assert fingerprint_db(pg, live_db) == fingerprint_db(pg, "chinook_source")

    again = run_module(MODULE, args)
    assert not again["changed"] and again["phases_ms"]["total"] < 2000

    back = run_module(MODULE, {**pg.module_args(), "db": live_db, "rollback": True})
    assert back["changed"] and fingerprint_db(pg, live_db) == before
    none_left = run_module(MODULE, {**pg.module_args(), "db": live_db, "rollback": True})
    assert none_left["failed"] and "no previous copy" in none_left["msg"]


def test_playbook_errors(pg: PgServer, live_db: str, tmp_path: Path):
    missing = run_module(MODULE, {**pg.module_args(), "db": live_db, "src": str(tmp_path / "nope.dump")})
    assert missing["failed"] and "does not exist" in missing["msg"] and "\n" not in missing["msg"]
    no_src = run_module(MODULE, {**pg.module_args(), "db": live_db})
    assert no_src["failed"] and "src" in no_src["msg"]


def test_ansible_doc_renders():
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-doc"), MODULE], env=ansible_env(),
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "[WARNING]" not in proc.stderr, proc.stderr
    for word in ("strategy", "keep_previous", "login_password", "restart_service", "switch_window_ms", "EXAMPLES"):
        assert word in proc.stdout
