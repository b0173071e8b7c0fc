"""playbooks/restore.yml and rollback.yml against localhost and a real server, as an operator runs them."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import drop_database
from tests.harness.ansible_run import ansible_env
from tests.harness.pg import PgServer, client_bindir
from tests.integration.conftest import fingerprint_db
from tests.integration.test_restore import databases

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.newest_major


@pytest.fixture
def backups(tmp_path: Path, dumps) -> Path:
    """A backup directory with an older and a newer dump of hoge_db and dumps of two shards."""
    d = tmp_path / "backups"
    d.mkdir()
    old, new = d / "hoge_db.2026-11-20.sql", d / "hoge_db.2026-11-24.dump"
    old.write_text("SELECT 1;\n")  # would restore an empty database: must not be picked
    shutil.copy(dumps["chinook"]["custom"], new)
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    for shard in ("shard_a", "shard_b"):
        shutil.copy(dumps["chinook"]["tar"], d / f"{shard}.tar")
    return d


@pytest.fixture
def inventory(tmp_path: Path, pg: PgServer, backups: Path) -> Path:
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "restore_connection": pg.module_args(),
        "restore_backup_dir": str(backups),
        "restore_bindir": str(client_bindir()),
    }
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps({"db": {"hosts": {"localhost": host}}}))
    return path


@pytest.fixture
def hoge_db(pg: PgServer, dumps):
    for name in ("hoge_db", "shard_a", "shard_b"):
        pg.sql(f"CREATE DATABASE {name} TEMPLATE chinook_source")
        pg.sql("DELETE FROM invoice_line", dbname=name)
    yield "hoge_db"
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname ~ '^(hoge_db|shard_a|shard_b)'"):
        drop_database(pg, name)


def playbook(inventory: Path, book: str, *args: str) -> subprocess.CompletedProcess:
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(ROOT / "playbooks" / book)]
    return subprocess.run([*argv, *args], env=ansible_env(), capture_output=True, text=True, timeout=900, check=False)


def recap_changed(proc: subprocess.CompletedProcess) -> int:
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("localhost") and "changed=" in ln)
    return int(line.split("changed=")[1].split()[0])


def test_restore_by_name_check_idempotence_and_rollback(pg: PgServer, inventory: Path, hoge_db: str):
    before, dbs = fingerprint_db(pg, hoge_db), databases(pg)

    checked = playbook(inventory, "restore.yml", "-e", "db=hoge_db", "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "rename" in checked.stdout and fingerprint_db(pg, hoge_db) == before and databases(pg) == dbs

    done = playbook(inventory, "restore.yml", "-e", "db=hoge_db")
    assert done.returncode == 0, done.stdout + done.stderr
    assert fingerprint_db(pg, hoge_db) == fingerprint_db(pg, "chinook_source")  # the newest dump, not the older one
    assert (
        "hoge_db.2026-11-24.dump" in done.stdout and "roll back: ansible-playbook playbooks/rollback.yml" in done.stdout
    )
    assert [d for d in databases(pg) if d.startswith("hoge_db_prev_")]

    again = playbook(inventory, "restore.yml", "-e", "db=hoge_db")
    assert again.returncode == 0 and recap_changed(again) == 0, again.stdout

    back = playbook(inventory, "rollback.yml", "-e", "db=hoge_db")
    assert back.returncode == 0, back.stdout + back.stderr
    assert fingerprint_db(pg, hoge_db) == before


def test_set_with_a_broken_dump_switches_none(pg: PgServer, inventory: Path, hoge_db: str, backups: Path):
    (backups / "shard_b.tar").write_bytes((backups / "shard_b.tar").read_bytes()[:30000])
    before = {db: fingerprint_db(pg, db) for db in ("hoge_db", "shard_a", "shard_b")}
    proc = playbook(inventory, "restore.yml", "-e", "dbs=hoge_db,shard_a,shard_b")
    assert proc.returncode != 0 and "before any database was switched" in proc.stdout, proc.stdout
    assert {db: fingerprint_db(pg, db) for db in before} == before
    assert not [d for d in databases(pg) if d.endswith("_pgops_staging") or "_prev_" in d]


def test_set_restores_all(pg: PgServer, inventory: Path, hoge_db: str):
    proc = playbook(inventory, "restore.yml", "-e", "dbs=hoge_db,shard_a,shard_b")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for db in ("hoge_db", "shard_a", "shard_b"):
        assert pg.sql("SELECT count(*) FROM invoice_line", dbname=db)[0][0] == 2240


def test_refuses_unclear_requests(inventory: Path):
    none = playbook(inventory, "restore.yml")
    assert none.returncode != 0 and "Name the database" in none.stdout
    missing = playbook(inventory, "restore.yml", "-e", "db=nothing_backed_up")
    assert missing.returncode != 0 and "nothing_backed_up" in missing.stdout


# --- the web-triggered command, driven as the sudo'ed process would run it -----------------------


def load_trigger(config: Path):
    loader = importlib.machinery.SourceFileLoader("pgops_restore", str(ROOT / "roles/restore/files/pgops-restore"))
    spec = importlib.util.spec_from_loader("pgops_restore", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    module.CONFIG = str(config)
    return module


def trigger(module, *argv: str) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as code:
        module.main(list(argv))
    return code.value.code, json.loads(out.getvalue().strip().splitlines()[-1])


def test_web_trigger_validates_then_restores(pg: PgServer, hoge_db: str, backups: Path, tmp_path: Path):
    config = tmp_path / "pgops-restore.json"
    config.write_text(json.dumps({
        "allowed_dbs": ["hoge_db"], "backup_dir": str(backups), "dump_pattern": "{db}.*",
        "libdir": str(ROOT / ".cache" / "collections"), "connection": pg.module_args(),
        "options": {"bindir": str(client_bindir()), "keep_previous": 1},
    }))  # fmt: skip
    module = load_trigger(config)
    before = fingerprint_db(pg, hoge_db)
    refused = [
        ("postgres",),
        ("hoge_db", "../hoge_db.2026-11-24.dump"),
        ("hoge_db", "hoge_db.2026-11-24.dump; rm -rf /"),
        ("hoge_db", "$(id).dump"),
        ("hoge_db", "missing.dump"),
        ("hoge_db", "x", "y"),
        ("--help",),
        (),
    ]
    for argv in refused:
        code, answer = trigger(module, *argv)
        assert code == 2 and not answer["ok"] and answer["error"], argv
    assert fingerprint_db(pg, hoge_db) == before and not [d for d in databases(pg) if "_prev_" in d]

    code, answer = trigger(module, "hoge_db")
    assert code == 0 and answer["ok"] and answer["changed"] and answer["dump"] == "hoge_db.2026-11-24.dump"
    assert answer["previous_db"].startswith("hoge_db_prev_")
    code, answer = trigger(module, "hoge_db", "hoge_db.2026-11-24.dump")
    assert code == 0 and not answer["changed"]
