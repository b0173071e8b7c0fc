"""The built collection artifact: what it holds, and that it installs into a clean path and its modules and
playbooks run from there, by name, as a user runs them (`ansible-playbook pgops.dbrestore.restore -e db=...`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import drop_database
from tests.harness.pg import PgServer, client_bindir

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VERSION = yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"]

pytestmark = pytest.mark.newest_major

# What users, ansible-galaxy and ansible-test need from the artifact.
REQUIRED = (
    "MANIFEST.json", "FILES.json", "README.md", "CHANGELOG.md", "COPYING",
    "meta/runtime.yml", "meta/execution-environment.yml", "changelogs/changelog.yaml", "changelogs/config.yaml",
    "plugins/modules/pg_restore_db.py", "plugins/modules/pg_terminate_connections.py",
    "plugins/doc_fragments/postgres.py", "plugins/module_utils/postgres.py",
    "roles/restore/tasks/main.yml", "roles/restore/meta/argument_specs.yml", "roles/restore/files/pgops-restore",
    "roles/sudo/tasks/main.yml", "roles/web_host/tasks/main.yml",
    "playbooks/restore.yml", "playbooks/rollback.yml", "playbooks/web_reload.yml", "playbooks/clear_sessions.yml",
    "docs/README.md", "docs/restore.md",
)  # fmt: skip
# Development only: never in the artifact (tests/sanity/ignore-*.txt excepted, ansible-test reads it).
DEV_ONLY = (
    "tests/", "extensions/", "bench/", "demo/", ".ci/", ".cache/", ".venv/", ".git/", "changelogs/fragments/",
    "Makefile", "ansible.cfg", "pyproject.toml", "requirements.txt", "execution-environment.yml", ".ansible-lint",
    ".gitignore", "changelogs/.plugin-cache.yaml", "docs/bench-scaling.png",
)  # fmt: skip


def clean_env(collections: Path) -> dict[str, str]:
    """No setting of this checkout: only the installed collection."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_NOCOLOR="1", PATH=f"{BIN}:{env['PATH']}")
    return env


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("artifact")
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", str(ROOT), "--output-path", str(out)],
                   check=True, capture_output=True)  # fmt: skip
    return out / f"pgops-dbrestore-{VERSION}.tar.gz"


@pytest.fixture(scope="module")
def installed(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("installed")
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", str(artifact), "-p", str(path)],
                   check=True, capture_output=True, env=clean_env(path))  # fmt: skip
    assert (path / "ansible_collections/pgops/dbrestore/MANIFEST.json").exists()
    return path


def test_artifact_holds_what_users_need_and_nothing_else(artifact: Path):
    with tarfile.open(artifact) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, f"missing from the artifact: {missing}"
    assert [n for n in names if n.startswith("tests/sanity/ignore-")], "ansible-test's ignore files are missing"
    dev = [n for n in names if n.startswith(DEV_ONLY) and not n.startswith("tests/sanity/ignore-")]
    dev += [n for n in names if n.endswith((".pyc", ".tar.gz")) or "__pycache__" in n]
    assert not dev, f"development files in the artifact: {dev}"


def test_built_artifact_installs_and_runs(pg: PgServer, installed: Path, tmp_path: Path):
    pg.sql("CREATE DATABASE smoke_db")
    holder = pg.connect("smoke_db")
    try:
        out = tmp_path / "result.json"
        book = tmp_path / "smoke.yml"
        args = {**pg.module_args(), "db": "smoke_db"}
        book.write_text(
            yaml.safe_dump(
                [
                    {
                        "name": "Smoke test of the installed collection",
                        "hosts": "localhost",
                        "gather_facts": False,
                        "tasks": [
                            {"name": "Clear smoke_db", "pgops.dbrestore.pg_terminate_connections": args,
                             "register": "cleared"},
                            {"name": "Keep the result", "ansible.builtin.copy": {
                                "content": "{{ cleared | to_json }}", "dest": str(out), "mode": "0600"}},
                        ],
                    }
                ]
            )
        )  # fmt: skip
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
             "-e", f"ansible_python_interpreter={sys.executable}", str(book)],
            env=clean_env(installed), cwd=tmp_path, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        result = json.loads(out.read_text())
        assert result["changed"] and result["terminated_count"] == 1
        assert _is_dead(holder), "the session on smoke_db survived"
    finally:
        holder.close()
        pg.sql("DROP DATABASE smoke_db")


def test_installed_playbooks_restore_and_roll_back(pg: PgServer, installed: Path, tmp_path: Path, dumps):
    """ansible-playbook pgops.dbrestore.restore -e db=... from the installed collection, then the rollback the
    report offers."""
    db = "artifact_hoge"
    pg.sql(f"CREATE DATABASE {db} TEMPLATE chinook_source")
    pg.sql("DELETE FROM invoice_line", dbname=db)
    backups = tmp_path / "backups"
    backups.mkdir()
    shutil.copy(dumps["chinook"]["custom"], backups / f"{db}.2026-11-24.dump")
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "restore_backup_dir": str(backups), "restore_bindir": str(client_bindir()),
            **{f"pgops_{k}": v for k, v in pg.module_args().items() if v not in (None, "")}}  # fmt: skip
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"db": {"hosts": {"localhost": host}}}))

    def run(book: str) -> subprocess.CompletedProcess:
        argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), f"pgops.dbrestore.{book}", "-e", f"db={db}"]
        return subprocess.run(argv, env=clean_env(installed), cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, check=False)  # fmt: skip

    try:
        restored = run("restore")
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert str(installed) in restored.stdout, "the playbook did not come from the installed collection"
        assert pg.sql("SELECT count(*) FROM invoice_line", dbname=db)[0][0] == 2240
        assert f"roll back: ansible-playbook -i {inventory} pgops.dbrestore.rollback -e db={db}" in restored.stdout

        back = run("rollback")
        assert back.returncode == 0, back.stdout + back.stderr
        assert pg.sql("SELECT count(*) FROM invoice_line", dbname=db)[0][0] == 0
    finally:
        for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (db + "%",)):
            drop_database(pg, name)


def _is_dead(conn) -> bool:
    try:
        conn.execute("SELECT 1")
    except Exception:  # noqa: BLE001 - any error means the session was ended
        return True
    return False


def test_execution_environment_definition_builds_a_context(artifact: Path, tmp_path: Path):
    """ansible-builder accepts execution-environment.yml with the built artifact (the image build needs a registry)."""
    ee = yaml.safe_load((ROOT / "execution-environment.yml").read_text())
    assert ee["dependencies"]["galaxy"]["collections"][0]["name"] == f"pgops-dbrestore-{VERSION}.tar.gz"
    shutil.copy(ROOT / "execution-environment.yml", tmp_path)
    shutil.copy(artifact, tmp_path)
    subprocess.run([str(BIN / "ansible-builder"), "create", "-f", "execution-environment.yml"], cwd=tmp_path,
                   check=True, capture_output=True)  # fmt: skip
    build = tmp_path / "context" / "_build"
    assert (build / "collections" / f"pgops-dbrestore-{VERSION}.tar.gz").exists()
    assert "psycopg" in (build / "requirements.txt").read_text()
    assert "postgresql" in (build / "bindep.txt").read_text()
