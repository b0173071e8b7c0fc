"""The built collection artifact installs into a clean path and its modules run from there."""

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

from tests.harness.pg import PgServer

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.newest_major


def test_built_artifact_installs_and_runs(pg: PgServer, tmp_path: Path):
    version = yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"]
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", str(ROOT), "--output-path", str(tmp_path)],
                   check=True, capture_output=True)  # fmt: skip
    artifact = tmp_path / f"pgops-dbrestore-{version}.tar.gz"
    with tarfile.open(artifact) as tar:
        names = tar.getnames()
    assert "plugins/modules/pg_terminate_connections.py" in names
    assert not [n for n in names if n.startswith((".cache", ".venv", ".git/", "tests/harness/__pycache__"))]

    installed = tmp_path / "installed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_COLLECTIONS_PATH=str(installed), ANSIBLE_NOCOLOR="1", PATH=f"{BIN}:{env['PATH']}")
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", str(artifact), "-p", str(installed)],
                   check=True, capture_output=True, env=env)  # fmt: skip
    assert (installed / "ansible_collections/pgops/dbrestore/MANIFEST.json").exists()

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
            env=env, cwd=tmp_path, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        result = json.loads(out.read_text())
        assert result["changed"] and result["count"] == 1
        assert _is_dead(holder), "the session on smoke_db survived"
    finally:
        holder.close()
        pg.sql("DROP DATABASE smoke_db")


def _is_dead(conn) -> bool:
    try:
        conn.execute("SELECT 1")
    except Exception:  # noqa: BLE001 - any error means the session was ended
        return True
    return False


def test_execution_environment_definition_builds_a_context(tmp_path: Path):
    """ansible-builder accepts execution-environment.yml with the built artifact (the image build needs a registry)."""
    version = yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"]
    ee = yaml.safe_load((ROOT / "execution-environment.yml").read_text())
    assert ee["dependencies"]["galaxy"]["collections"][0]["name"] == f"pgops-dbrestore-{version}.tar.gz"
    shutil.copy(ROOT / "execution-environment.yml", tmp_path)
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", str(ROOT), "--output-path", str(tmp_path)],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([str(BIN / "ansible-builder"), "create", "-f", "execution-environment.yml"], cwd=tmp_path,
                   check=True, capture_output=True)  # fmt: skip
    build = tmp_path / "context" / "_build"
    assert (build / "collections" / f"pgops-dbrestore-{version}.tar.gz").exists()
    assert "psycopg" in (build / "requirements.txt").read_text()
    assert "postgresql" in (build / "bindep.txt").read_text()
