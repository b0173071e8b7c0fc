"""module_utils on the oldest Pythons a managed host may have (3.8, 3.9), against a real server.

ansible-test's sanity and unit runs import the code on those Pythons without a server; this runs the
records (Registry: restore marker, copies, blocks) and the naming of copies for real. Each interpreter
gets a virtualenv with psycopg, made once and kept under .cache/old-pythons/. Interpreters are looked
up under `pyenv root`/versions and on PATH; a missing one skips its test and says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.copies import (
    name_base,
    previous_name,
    staging_name,
    undone_name,
)
from tests.conftest import drop_database
from tests.harness.pg import PgServer

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".cache" / "old-pythons"
PSYCOPG = "psycopg[binary]>=3.2,<4"  # as tests/unit/requirements.txt
pytestmark = pytest.mark.edge_majors

SCRIPT = r"""
import json, sys
sys.path[:0] = [sys.argv[1]]
from ansible_collections.pgops.dbrestore.plugins.module_utils import restore  # the whole import chain
from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import BlockState
from ansible_collections.pgops.dbrestore.plugins.module_utils.copies import (
    name_base, previous_name, staging_name, undone_name)
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import ConnParams, connect, database_oid
from ansible_collections.pgops.dbrestore.plugins.module_utils.registry import Registry

params, db, stamp = ConnParams(**json.loads(sys.argv[2])), sys.argv[3], sys.argv[4]
out = {"python": "%d.%d" % sys.version_info[:2],
       "names": [name_base(db), staging_name(db), previous_name(db, stamp), undone_name(db, stamp)]}
with connect(params) as conn:
    oid = database_oid(conn, db)
    reg = Registry(conn)
    out["before"] = reg.marker(oid)
    reg.write_marker(oid, db, {"sha256": "ab" * 32, "format": "custom", "size": 123, "src": "x.dump", "writes": 7})
    state = BlockState("revoke_connect", closed=False, acl=((None, "CONNECT", False), ("app", "CONNECT", True)))
    reg.add_copy(oid, db, "the live one", "previous", state)
    reg.set_block(oid, db, state)
with connect(params) as conn:  # read back on a new connection: what was written is committed
    reg = Registry(conn)
    marker = reg.marker(oid)
    out["marker"] = {k: marker[k] for k in ("sha256", "format", "size", "src", "writes")}
    out["restored_at"] = marker["restored_at"]
    out["copies"] = [[c.name, c.kind, c.block_state.to_json()] for c in reg.copies("the live one", "previous")]
    out["block"] = reg.block(oid).to_json()
    reg.forget(oid)
    out["after_forget"] = [reg.marker(oid), reg.block(oid), reg.copies("the live one", "previous")]
print(json.dumps(out))
"""


def find_python(version: str) -> str | None:
    """pythonX.Y from pyenv's versions (newest patch release first), else from PATH."""
    candidates = []
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=False).stdout.strip()
        if root:
            found = Path(root, "versions").glob(f"{version}.*/bin/python{version}")
            candidates += sorted(found, key=lambda p: [int(x) for x in p.parts[-3].split(".") if x.isdigit()],
                                 reverse=True)  # fmt: skip
    on_path = shutil.which(f"python{version}")
    candidates += [Path(on_path)] if on_path else []
    for exe in candidates:
        probe = subprocess.run([str(exe), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, check=False)  # fmt: skip
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return str(exe)
    return None


def venv_python(version: str) -> str:
    """A virtualenv of that Python with psycopg, made once (under a lock: pytest processes may race)."""
    exe = find_python(version)
    if exe is None:
        pytest.skip(f"no Python {version} interpreter (looked in `pyenv root`/versions and on PATH)")
    VENVS.mkdir(parents=True, exist_ok=True)
    venv = VENVS / version
    python, done = venv / "bin" / "python", venv / ".installed"
    with open(VENVS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists() or done.read_text() != f"{exe}\n{PSYCOPG}\n":
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([exe, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", PSYCOPG],
                           check=True)  # fmt: skip
            done.write_text(f"{exe}\n{PSYCOPG}\n")
    return str(python)


@pytest.fixture
def maintenance_db(pg: PgServer):
    """A maintenance database of its own, so these records do not mix with other tests' ones."""
    name = f"maint_py_{uuid.uuid4().hex[:6]}"
    pg.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield name
    drop_database(pg, name)


@pytest.mark.parametrize("version", ["3.8", "3.9"])
def test_records_and_names_on_old_python(pg: PgServer, maintenance_db: str, dbname: str, version: str):
    python = venv_python(version)
    params = {k: v for k, v in pg.params(login_db=maintenance_db).__dict__.items() if k != "connect_params"}
    stamp = "20261125T101010123Z"
    proc = subprocess.run(
        [python, "-c", SCRIPT, str(ROOT / ".cache" / "collections"), json.dumps(params), dbname, stamp],
        capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["python"] == version
    assert out["names"] == [name_base(dbname), staging_name(dbname), previous_name(dbname, stamp),
                            undone_name(dbname, stamp)]  # fmt: skip
    assert out["before"] is None
    assert out["marker"] == {"sha256": "ab" * 32, "format": "custom", "size": 123, "src": "x.dump", "writes": 7}
    assert out["restored_at"].endswith("Z") and len(out["restored_at"]) == len("2026-11-25T10:10:10Z")
    state = json.dumps({"method": "revoke_connect", "closed": False,
                        "acl": [[None, "CONNECT", False], ["app", "CONNECT", True]], "null_acl": False,
                        "superuser": False})  # fmt: skip
    assert out["copies"] == [[dbname, "previous", state]] and out["block"] == state
    assert out["after_forget"] == [None, None, []]
    # the records went to the maintenance database given as login_db, and forget() took them out again
    for table in ("restored", "copies", "blocks"):
        assert pg.sql(f"SELECT count(*) FROM pgops_dbrestore.{table}", dbname=maintenance_db) == [(0,)]
