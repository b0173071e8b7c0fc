"""The operations bench/run.py times: drops under a storm and restores, by the collection and by its peers.

Every function raises on failure (psycopg.Error, PgOpsError, Failed) so the caller records a
failure instead of a time; none of them retries what a user's script would not retry.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.pooler import Pooler
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import ClearRequest, clear_sessions
from tests.harness.ansible_run import ansible_env, run_module
from tests.harness.pg import PgServer, client_bindir

JOBS = os.cpu_count() or 1


class Failed(Exception):
    """A step a user would see fail (non-zero exit, failed Ansible task)."""


def _drop(db: str, force: bool = False) -> sql.Composable:
    return sql.SQL("DROP DATABASE {}{}").format(sql.Identifier(db), sql.SQL(" WITH (FORCE)" if force else ""))


def _tool(pg: PgServer, name: str, *args: str, ok_errors: tuple[str, ...] = ()) -> None:
    """Run a PG 18 client tool; ok_errors are error lines a caller accepts (pg_restore continues past them)."""
    proc = subprocess.run(
        [str(client_bindir() / name), *args], env=pg.client_env(), capture_output=True, text=True, check=False
    )
    if proc.returncode == 0:
        return
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln and "errors ignored on restore" not in ln]
    if ok_errors and errors and all(any(e in ln for e in ok_errors) for ln in errors):
        return
    raise Failed(f"{name}: {(errors or proc.stderr.strip().splitlines() or ['exit ' + str(proc.returncode)])[-1]}")


def pg_restore(pg: PgServer, db: str, dump: Path, jobs: int) -> None:
    """pg_restore as people run it (no --exit-on-error). pg_restore 18 sends SET transaction_timeout,
    which servers before 17 reject and skip: that one error is not counted as a failure."""
    old = ("transaction_timeout",) if pg.major < 17 else ()
    _tool(pg, "pg_restore", f"--jobs={jobs}", "--no-password", "-d", db, str(dump), ok_errors=old)


# --- scenario 1: dropping a database that reconnecting clients keep using ------------------------


def drop_naive(pg: PgServer, db: str) -> None:
    pg.sql(_drop(db))


def drop_terminate_then_drop(pg: PgServer, db: str) -> None:
    # the classic recipe, both statements on one connection (the most favourable way to run it)
    with pg.connect() as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (db,),
        )
        conn.execute(_drop(db))


def drop_clear_sessions(pg: PgServer, db: str) -> None:
    clear_sessions(pg.params(), ClearRequest(db=db, state="blocked", block="allow_connections"))
    pg.sql(_drop(db))


def drop_with_force(pg: PgServer, db: str) -> None:
    pg.sql(_drop(db, force=True))


DROP_METHODS = {
    "naive DROP": drop_naive,
    "terminate then DROP": drop_terminate_then_drop,
    "clear_sessions (block) + DROP": drop_clear_sessions,
    "DROP … WITH (FORCE)": drop_with_force,
}


def drop_reliably(pg: PgServer, db: str) -> None:
    """Clean-up between trials, never timed."""
    if pg.sql("SELECT 1 FROM pg_database WHERE datname = %s", (db,)):
        drop_clear_sessions(pg, db)


# --- scenario 2/3/4: restoring a database ------------------------------------------------------


def _request(db: str, dump: Path, strategy: str, force: bool, **extra: object) -> RestoreRequest:
    # the same work as the raw tools: as many jobs, no ANALYZE
    return RestoreRequest(db=db, src=str(dump), strategy=strategy, force=force, bindir=str(client_bindir()),
                          jobs=JOBS, analyze=False, **extra)  # type: ignore[arg-type]  # fmt: skip


def restore_swap(pg: PgServer, db: str, dump: Path, force: bool = True, **extra: object) -> dict:
    """pg_restore_db strategy=swap; force=True restores again even when the database holds this dump."""
    return restore_database(pg.params(), _request(db, dump, "swap", force, **extra)).as_dict()


def restore_swap_progress(pg: PgServer, db: str, dump: Path) -> dict:
    """swap recording its progress file every second (pg_restore --verbose, the server's progress views)."""
    with tempfile.TemporaryDirectory() as tmp:
        return restore_swap(pg, db, dump, True, progress_dir=tmp)


def rerun_identity(pg: PgServer, db: str, dump: Path) -> dict:
    """A rerun that finds the same dump by the file's identity (reads none of it)."""
    return restore_swap(pg, db, dump, False)


def rerun_full_hash(pg: PgServer, db: str, dump: Path) -> dict:
    """A rerun that reads and hashes the whole dump (verify_checksum=full, what every rerun did before)."""
    return restore_swap(pg, db, dump, False, verify_checksum="full")


def restore_swap_pooled(pg: PgServer, db: str, dump: Path, pgbouncers: list[dict]) -> dict:
    """pg_restore_db swap with PgBouncer paused around the switch (pgbouncers); [] is the plain swap."""
    request = _request(db, dump, "swap", True)
    request.pgbouncers = tuple(Pooler.from_params(b, db) for b in pgbouncers)
    return restore_database(pg.params(), request).as_dict()


def restore_replace(pg: PgServer, db: str, dump: Path) -> dict:
    return restore_database(pg.params(), _request(db, dump, "replace", True)).as_dict()


def restore_raw(pg: PgServer, db: str, dump: Path) -> dict:
    """terminate, then dropdb && createdb && pg_restore -jN, as a shell script does it."""
    query = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"
    _tool(pg, "psql", "-X", "-q", "-d", "postgres", "-c", query)
    _tool(pg, "dropdb", db)
    _tool(pg, "createdb", db)
    pg_restore(pg, db, dump, JOBS)
    return {}


COMMUNITY_PLAY = """
- name: Restore a database the way community.postgresql users do
  hosts: localhost
  gather_facts: false
  module_defaults:
    community.postgresql.postgresql_db: "{{ login }}"
  tasks:
    - name: Drop it
      community.postgresql.postgresql_db: {name: "{{ db }}", state: absent, force: true}
    - name: Create it
      community.postgresql.postgresql_db: {name: "{{ db }}", state: present}
    - name: Restore the dump
      community.postgresql.postgresql_db: {name: "{{ db }}", state: restore, target: "{{ dump }}"}
"""


def restore_community(pg: PgServer, db: str, dump: Path) -> dict:
    """community.postgresql.postgresql_db absent (force) / present / restore in one ansible-playbook run.

    The module picks pg_restore by the file extension (.pgc = custom) and finds it on PATH. Against
    servers before 17 it gets the plain .sql dump instead: its psql run goes past the one
    statement (SET transaction_timeout) those servers reject, while pg_restore would exit 1.
    """
    dump = dump if pg.major >= 17 else dump.with_suffix(".sql")
    login = dict(login_host="127.0.0.1", login_port=pg.port, login_user="postgres", login_password=_password(pg))
    with tempfile.TemporaryDirectory() as tmp:
        book, extra = Path(tmp) / "play.yml", Path(tmp) / "vars.json"
        book.write_text(COMMUNITY_PLAY)
        extra.write_text(json.dumps({"login": login, "db": db, "dump": str(dump)}))
        env = ansible_env()
        env["PATH"] = f"{client_bindir()}:{env['PATH']}"
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                "-e", f"ansible_python_interpreter={sys.executable}", "-e", f"@{extra}", str(book)]  # fmt: skip
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        fatal = [ln for ln in proc.stdout.splitlines() if "fatal:" in ln or '"msg"' in ln or "msg:" in ln]
        raise Failed(f"ansible-playbook exit {proc.returncode}: {' '.join(fatal)[:300]}")
    return {}


def _password(pg: PgServer) -> str:
    return pg.client_env()["PGPASSWORD"]


RESTORE_METHODS = {
    "pg_restore_db swap": restore_swap,
    "pg_restore_db replace": restore_replace,
    "community.postgresql postgresql_db": restore_community,
    "terminate + dropdb/createdb/pg_restore": restore_raw,
}


def restore_via_ansible(pg: PgServer, db: str, dump: Path) -> dict:
    """pg_restore_db through ansible-playbook, for the Ansible overhead of an idempotent rerun."""
    result = run_module("pgops.dbrestore.pg_restore_db", {**pg.module_args(), "db": db, "src": str(dump)})
    if result.get("failed"):
        raise Failed(f"pg_restore_db: {result.get('msg')}")
    return result


def _role_inventory(pg: PgServer, path: Path) -> Path:
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "restore_bindir": str(client_bindir()),
            **{f"pgops_{k}": v for k, v in pg.module_args().items() if v not in (None, "")}}  # fmt: skip
    path.write_text(json.dumps({"db": {"hosts": {"localhost": host}}}))
    return path


def rerun_via_role(pg: PgServer, db: str, dump: Path) -> dict:
    """ansible-playbook pgops.dbrestore.restore -e db=DB -e dump=DUMP, as a person reruns it."""
    with tempfile.TemporaryDirectory() as tmp:
        inventory = _role_inventory(pg, Path(tmp) / "inventory.json")
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
                "pgops.dbrestore.restore", "-e", f"db={db}", "-e", f"dump={dump}"]  # fmt: skip
        proc = subprocess.run(argv, env=ansible_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise Failed(f"ansible-playbook pgops.dbrestore.restore exit {proc.returncode}: {proc.stdout[-300:]}")
    return {"changed": re.search(r"\bchanged=0\b", proc.stdout) is None}


def ansible_floor(pg: PgServer, db: str, dump: Path) -> dict:
    """ansible-playbook of one debug task on the same inventory: what any playbook run costs here."""
    with tempfile.TemporaryDirectory() as tmp:
        inventory = _role_inventory(pg, Path(tmp) / "inventory.json")
        book = Path(tmp) / "floor.yml"
        book.write_text("- hosts: db\n  gather_facts: false\n  tasks:\n    - ansible.builtin.debug: {msg: hi}\n")
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(book)]
        proc = subprocess.run(argv, env=ansible_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise Failed(f"ansible-playbook exit {proc.returncode}")
    return {"changed": False}


# --- scenario 10: refreshing a database from another server --------------------------------------


def source_options(source: PgServer, db: str) -> dict:
    """pg_restore_db's source suboptions for a database of the source server."""
    p = source.params()
    return {"host": p.login_host, "port": p.login_port, "user": p.login_user, "password": p.login_password, "db": db,
            "ssl_mode": p.ssl_mode}  # fmt: skip


def refresh_from_server(pg: PgServer, db: str, source: PgServer, source_db: str) -> dict:
    """pg_restore_db with source=: pg_dump of the source streamed into a staging copy (JOBS streams), then the swap."""
    req = RestoreRequest(db=db, source=source_options(source, source_db), bindir=str(client_bindir()), jobs=JOBS,
                         analyze=False)  # fmt: skip
    return restore_database(pg.params(), req).as_dict()


def dump_pipe_restore(pg: PgServer, db: str, source: PgServer, source_db: str) -> dict:
    """By hand into a fresh database: pg_dump -Fc -d SOURCE | pg_restore -d TARGET (a pipe: one job)."""
    dump = subprocess.Popen([str(client_bindir() / "pg_dump"), "-Fc", "--no-password", "-d", source_db],
                            env=source.client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    restore = subprocess.run([str(client_bindir() / "pg_restore"), "--no-password", "-d", db],
                             env=pg.client_env(), stdin=dump.stdout, capture_output=True, text=True,
                             check=False)  # fmt: skip
    dump.stdout.close()  # type: ignore[union-attr]
    dump_err = dump.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
    if dump.wait() != 0 or restore.returncode != 0:
        raise Failed(f"pg_dump | pg_restore: {(dump_err + restore.stderr).strip().splitlines()[-1:]}")
    return {}
