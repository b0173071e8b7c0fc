"""The collection's playbooks (pgops.dbrestore.restore, rollback, clear_sessions) against localhost and a
real server, run by name as an operator runs them from the installed collection."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import drop_database
from tests.harness.ansible_run import ansible_env
from tests.harness.pg import PgServer, client_bindir
from tests.integration.conftest import fingerprint_db

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.newest_major

# The community.postgresql connection options; the playbooks take each from pgops_<option>.
CONNECTION_OPTIONS = (
    "login_user", "login_password", "login_host", "login_port", "login_unix_socket", "login_db",
    "ssl_mode", "ca_cert", "ssl_cert", "ssl_key", "connect_timeout", "connect_params",
)  # fmt: skip
# What a backup directory holds besides dumps, all newer than the dump: none may be taken for one.
NOT_DUMPS = (
    "hoge_db.2026-11-25.dump.sha256",
    "hoge_db.2026-11-25.dump.md5",
    "hoge_db.2026-11-25.dump.tmp",
    "hoge_db.2026-11-25.partial",
    ".hoge_db.2026-11-25.dump",
)


def login_vars(pg: PgServer, **overrides) -> dict:
    """The pgops_* inventory variables for the test server (the options that are set)."""
    return {f"pgops_{k}": v for k, v in pg.module_args(**overrides).items() if v not in (None, "")}


@pytest.fixture
def backups(tmp_path: Path, dumps) -> Path:
    """A backup directory with an older and a newer dump of hoge_db, newer non-dumps, and dumps of two shards."""
    d = tmp_path / "backups"
    d.mkdir()
    old, new = d / "hoge_db.2026-11-20.sql", d / "hoge_db.2026-11-24.dump"
    old.write_text("SELECT 1;\n")  # would restore an empty database: must not be picked
    shutil.copy(dumps["chinook"]["custom"], new)
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    os.utime(new, (time.time() - 3600, time.time() - 3600))
    for name in NOT_DUMPS:  # newest of all, and not dumps: taking one fails the dry-run
        (d / name).write_text("not a dump\n")
    for shard in ("shard_a", "shard_b"):
        shutil.copy(dumps["chinook"]["tar"], d / f"{shard}.tar")
    return d


def write_inventory(path: Path, host: dict, groups: dict | None = None) -> Path:
    base = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    path.write_text(json.dumps({"db": {"hosts": {"localhost": {**base, **host}}}, **(groups or {})}))
    return path


@pytest.fixture
def inventory(tmp_path: Path, pg: PgServer, backups: Path) -> Path:
    host = {**login_vars(pg), "restore_backup_dir": str(backups), "restore_bindir": str(client_bindir())}
    return write_inventory(tmp_path / "inventory.json", host)


@pytest.fixture
def hoge_db(pg: PgServer, dumps):
    for name in ("hoge_db", "shard_a", "shard_b"):
        pg.sql(f"CREATE DATABASE {name} TEMPLATE chinook_source")
        pg.sql("DELETE FROM invoice_line", dbname=name)
    yield "hoge_db"
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname ~ '^(hoge_db|shard_a|shard_b)'"):
        drop_database(pg, name)


def playbook(inventory: Path, book: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """ansible-playbook -i INVENTORY pgops.dbrestore.BOOK ARGS (a playbook of the collection, by name)."""
    book = book if book.endswith(".yml") else f"pgops.dbrestore.{book}"
    argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), book, *args]
    return subprocess.run(argv, env={**ansible_env(), **(env or {})}, capture_output=True, text=True, timeout=900,
                          check=False)  # fmt: skip


def recap_changed(proc: subprocess.CompletedProcess) -> int:
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("localhost") and "changed=" in ln)
    return int(line.split("changed=")[1].split()[0])


def report(proc: subprocess.CompletedProcess) -> str:
    """The run's report with the callback's line wrapping undone."""
    return re.sub(r"\s*\n\s+", " ", proc.stdout)


def test_restore_by_name_check_idempotence_and_rollback(pg: PgServer, inventory: Path, hoge_db: str, backups: Path):
    before, dbs = fingerprint_db(pg, hoge_db), pg.databases()

    checked = playbook(inventory, "restore", "-e", "db=hoge_db", "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "rename" in checked.stdout and fingerprint_db(pg, hoge_db) == before and pg.databases() == dbs

    done = playbook(inventory, "restore", "-e", "db=hoge_db")
    assert done.returncode == 0, done.stdout + done.stderr
    # the newest dump: not the older one, nor the newer checksum, temporary, partial and dot files
    assert fingerprint_db(pg, hoge_db) == fingerprint_db(pg, "chinook_source")
    text = report(done)
    assert f"hoge_db: restored from {backups / 'hoge_db.2026-11-24.dump'} (custom format) by swap" in text, text
    assert re.search(r"app-visible window \d+ ms: \d+ session\(s\) ended", text), text
    # phases as prose, not a Python dict
    assert re.search(r"phases: lock \d+ ms, .*stage \d+ ms, .*switch \d+ ms.* \(total \d+ ms\)", text), text
    assert "{'" not in text and "phases_ms" not in text
    # the previous copy it names exists, and the rollback command it offers is the one run below
    previous = re.search(r"previous copy: (hoge_db_prev_\w+), kept for rollback", text).group(1)
    assert previous in pg.databases()
    assert f"roll back: ansible-playbook -i {inventory} pgops.dbrestore.rollback -e db=hoge_db" in text, text

    again = playbook(inventory, "restore", "-e", "db=hoge_db")
    assert again.returncode == 0 and recap_changed(again) == 0, again.stdout
    assert "hoge_db: already holds" in report(again) and "roll back:" not in again.stdout

    back = playbook(inventory, "rollback", "-e", "db=hoge_db")
    assert back.returncode == 0, back.stdout + back.stderr
    assert fingerprint_db(pg, hoge_db) == before
    assert previous not in pg.databases() and [d for d in pg.databases() if d.startswith("hoge_db_undone_")]


def test_no_previous_copy_no_rollback_offered(pg: PgServer, inventory: Path, hoge_db: str):
    proc = playbook(inventory, "restore", "-e", "db=hoge_db", "-e", "restore_keep_previous=0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = report(proc)
    assert "no previous copy kept (restore_keep_previous=0)" in text, text
    assert "roll back:" not in text and "previous copy: " not in text
    assert not [d for d in pg.databases() if d.startswith("hoge_db_prev_")]


# the staging and previous copies of the set's databases (other tests' databases may share the server meanwhile)
SET_COPIES = tuple(f"{db}{kind}" for db in ("hoge_db", "shard_a", "shard_b") for kind in ("_pgops_staging", "_prev_"))


def test_set_with_a_broken_dump_switches_none(pg: PgServer, inventory: Path, hoge_db: str, backups: Path):
    (backups / "shard_b.tar").write_bytes((backups / "shard_b.tar").read_bytes()[:30000])
    before = {db: fingerprint_db(pg, db) for db in ("hoge_db", "shard_a", "shard_b")}
    proc = playbook(inventory, "restore", "-e", "dbs=hoge_db,shard_a,shard_b")
    # the dry run before staging reads every dump through: the damaged one stops the set there
    assert proc.returncode != 0 and "shard_b.tar' is not readable (tar format): truncated" in proc.stdout, proc.stdout
    assert {db: fingerprint_db(pg, db) for db in before} == before
    assert not [d for d in pg.databases() if d.startswith(SET_COPIES)]


def test_set_with_a_dump_that_fails_to_load_switches_none(pg: PgServer, inventory: Path, hoge_db: str, backups: Path):
    (backups / "shard_b.sql").write_text("CREATE TABLE t (x int);\nSELECT no_such_function();\n")  # the newest
    before = {db: fingerprint_db(pg, db) for db in ("hoge_db", "shard_a", "shard_b")}
    proc = playbook(inventory, "restore", "-e", "dbs=hoge_db,shard_a,shard_b")
    assert proc.returncode != 0 and "before any database was switched" in proc.stdout, proc.stdout
    assert {db: fingerprint_db(pg, db) for db in before} == before
    assert not [d for d in pg.databases() if d.startswith(SET_COPIES)]


def test_set_restores_all(pg: PgServer, inventory: Path, hoge_db: str):
    proc = playbook(inventory, "restore", "-e", "dbs=hoge_db,shard_a,shard_b")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for db in ("hoge_db", "shard_a", "shard_b"):
        assert pg.sql("SELECT count(*) FROM invoice_line", dbname=db)[0][0] == 2240
    text = report(proc)
    for db in ("hoge_db", "shard_a", "shard_b"):
        assert f"roll back: ansible-playbook -i {inventory} pgops.dbrestore.rollback -e db={db}" in text


# --- refused before anything is staged, each with a message saying what to set or create ------------


def refused(pg: PgServer, proc: subprocess.CompletedProcess, dbs_before: set[str], *needles: str,
            before_dry_run: bool = True) -> str:  # fmt: skip
    """The run failed with a clear message and left the databases as they were."""
    assert proc.returncode != 0, proc.stdout
    text = report(proc)
    assert "Unknown error" not in text and "Traceback" not in proc.stdout + proc.stderr
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{proc.stdout}"
    assert pg.databases() == dbs_before, "something was staged or renamed"
    if before_dry_run:
        assert "Dry-run each restore" not in proc.stdout, "refused only after the dry-run"
    return text


def test_refuses_unclear_requests(pg: PgServer, inventory: Path, hoge_db: str):
    dbs = pg.databases()
    refused(pg, playbook(inventory, "restore"), dbs, "Name the database")


def test_refuses_a_set_with_a_database_mapped_to_a_host_outside_the_play(pg: PgServer, inventory: Path, hoge_db: str):
    dbs = pg.databases()
    proc = playbook(inventory, "restore", "-e", "dbs=shard_a,shard_b", "-e", '{"restore_db_hosts": {"shard_b": "db9"}}')
    refused(pg, proc, dbs, "restore_db_hosts maps shard_b to db9, not a host of this play (localhost): fix "
            "restore_db_hosts or db_hosts (and --limit).")  # fmt: skip


def test_refuses_a_missing_backup_directory(pg: PgServer, inventory: Path, hoge_db: str, tmp_path: Path):
    dbs, missing = pg.databases(), tmp_path / "no-such-dir"
    proc = playbook(inventory, "restore", "-e", "db=hoge_db", "-e", f"restore_backup_dir={missing}")
    refused(pg, proc, dbs, f"The backup directory {missing} does not exist on localhost",
            "set restore_backup_dir", "create it", "-e dump=PATH")  # fmt: skip


def test_refuses_a_database_without_a_dump(pg: PgServer, inventory: Path, hoge_db: str, backups: Path):
    dbs = pg.databases()
    proc = playbook(inventory, "restore", "-e", "db=nothing_backed_up")
    refused(pg, proc, dbs, f"No dump of nothing_backed_up in {backups} on localhost",
            "nothing_backed_up.*", "restore_dump_pattern", "-e dump=PATH")  # fmt: skip
    # only checksums and partial files of it: still no dump
    (backups / "hoge_db.2026-11-24.dump").unlink()
    (backups / "hoge_db.2026-11-20.sql").unlink()
    proc = playbook(inventory, "restore", "-e", "db=hoge_db")
    refused(pg, proc, dbs, f"No dump of hoge_db in {backups}", "*.sha256, *.md5, *.tmp, *.partial are ignored")


def test_refuses_a_missing_named_dump(pg: PgServer, inventory: Path, hoge_db: str, tmp_path: Path):
    dbs, missing = pg.databases(), tmp_path / "hoge_db.missing.dump"
    proc = playbook(inventory, "restore", "-e", "db=hoge_db", "-e", f"dump={missing}")
    refused(pg, proc, dbs, f"The dump {missing} of hoge_db does not exist on localhost", "-e dump=",
            before_dry_run=False)  # fmt: skip


def test_refuses_an_unreadable_dump(pg: PgServer, inventory: Path, hoge_db: str, dumps):
    """The play runs as a user who cannot read the dump (as root: it becomes the test servers' OS user)."""
    place = Path(tempfile.mkdtemp(prefix="pgops-unreadable-"))
    try:
        place.chmod(0o755)
        dump = place / "hoge_db.2026-11-24.dump"
        shutil.copy(dumps["chinook"]["custom"], dump)
        dump.chmod(0o600 if os.geteuid() == 0 else 0)
        extra = ["-e", "db=hoge_db", "-e", f"restore_backup_dir={place}"]
        if os.geteuid() == 0:
            system_python = shutil.which("python3", path=os.defpath)  # one the other user may run
            assert system_python, "no python3 on the default PATH"
            become = {"ansible_become": True, "ansible_become_user": pg.os_user,
                      "ansible_become_method": "ansible.builtin.su", "ansible_become_flags": "-s /bin/sh"}  # fmt: skip
            extra += ["-e", json.dumps({**become, "ansible_python_interpreter": system_python})]
        dbs = pg.databases()
        proc = playbook(inventory, "restore", *extra, env={"ANSIBLE_PIPELINING": "1"})
        refused(pg, proc, dbs, f"The dump {dump} of hoge_db cannot be read by the user the play runs as",
                "Make it readable", before_dry_run=False)  # fmt: skip
    finally:
        shutil.rmtree(place)


# --- variables: typed, numbers from -e work ----------------------------------------------------------


def test_numbers_from_extra_vars(pg: PgServer, inventory: Path, hoge_db: str):
    # a string from -e is a number: a margin of 100000 times the live size cannot fit
    dbs = pg.databases()
    proc = playbook(inventory, "restore", "-e", "db=hoge_db", "-e", "restore_space_margin=100000")
    refused(pg, proc, dbs, "Not enough free space for strategy=swap", "restore_space_margin 100000.0",
            before_dry_run=False)  # fmt: skip
    for bad in ("restore_space_margin=lots", "restore_jobs=two", "restore_keep_previous=1.5.0"):
        proc = playbook(inventory, "restore", "-e", "db=hoge_db", "-e", bad)
        refused(pg, proc, dbs, f"argument '{bad.split('=', maxsplit=1)[0]}'", "Validation of arguments failed")

    proc = playbook(inventory, "restore", "-v", "-e", "db=hoge_db", "-e", "restore_space_margin=1.5",
                    "-e", "restore_jobs=2", "-e", "restore_wait_timeout=20")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^\s+jobs: 2$", proc.stdout, re.M), proc.stdout


def test_jobs_default_to_half_the_cpus(pg: PgServer, inventory: Path, hoge_db: str):
    proc = playbook(inventory, "restore", "-v", "-e", "db=hoge_db")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cpus = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    assert re.search(rf"^\s+jobs: {max(cpus // 2, 1)}$", proc.stdout, re.M), proc.stdout


# --- one way to connect; module_defaults are the user's -----------------------------------------------


def test_no_module_call_names_a_connection_option():
    """The connection reaches the modules through module_defaults only: a task argument, even one left out with
    default(omit), would hide the play's module_defaults for group/pgops.dbrestore.postgres. And the role never
    sets that group's module_defaults itself."""
    files = [*sorted((ROOT / "roles" / "restore" / "tasks").glob("*.yml")), *sorted((ROOT / "playbooks").glob("*.yml"))]
    calls = 0
    for path in files:
        for task in walk_tasks(yaml.safe_load(path.read_text()) or []):
            if path.parent.name == "tasks":
                assert "group/pgops.dbrestore.postgres" not in (task.get("module_defaults") or {}), path.name
            for module in ("pgops.dbrestore.pg_restore_db", "pgops.dbrestore.pg_terminate_connections"):
                if module in task:
                    calls += 1
                    args = task[module]
                    assert isinstance(args, dict), f"{path.name}: {task['name']}: arguments as one template"
                    named = set(CONNECTION_OPTIONS) & set(args)
                    assert not named, f"{path.name}: {task['name']} names {named}"
    assert calls >= 7


def walk_tasks(items: list) -> list[dict]:
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        out.append(item)
        for key in ("block", "rescue", "always", "tasks"):
            out += walk_tasks(item.get(key) or [])
    return out


def test_the_role_keeps_the_users_module_defaults(pg: PgServer, tmp_path: Path, backups: Path, hoge_db: str):
    """No pgops_* variable set: the connection comes from the play's module_defaults, untouched by the role."""
    host = {"restore_backup_dir": str(backups), "restore_bindir": str(client_bindir())}
    inventory = write_inventory(tmp_path / "plain.json", host)
    connection = {k: v for k, v in pg.module_args().items() if v not in (None, "")}
    book = tmp_path / "mine.yml"
    book.write_text(yaml.safe_dump([{
        "name": "My play",
        "hosts": "db",
        "gather_facts": False,
        "module_defaults": {"group/pgops.dbrestore.postgres": connection},
        "roles": [{"role": "pgops.dbrestore.restore", "vars": {"restore_dbs": ["hoge_db"]}}],
    }]))  # fmt: skip
    proc = playbook(inventory, str(book))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pg.sql("SELECT count(*) FROM invoice_line", dbname="hoge_db")[0][0] == 2240


def test_deprecated_names_still_work_and_say_so(pg: PgServer, tmp_path: Path, backups: Path, hoge_db: str):
    """restore_connection and the old restart_* variable names; the run names each, and the analyze
    the module gets is the module's own default."""
    host = {"restore_connection": pg.module_args(), "restore_backup_dir": str(backups),
            "restore_bindir": str(client_bindir()), "restore_service_name": "pg-old-name"}  # fmt: skip
    inventory = write_inventory(tmp_path / "old.json", host)
    # -vvv: the module arguments (invocation) of each pg_restore_db call are shown
    proc = playbook(inventory, "restore", "-vvv", "-e", "db=hoge_db", "-e", "restore_restart_user=pg-old-user")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pg.sql("SELECT count(*) FROM invoice_line", dbname="hoge_db")[0][0] == 2240
    text = report(proc)
    assert "restore_service_name is deprecated, set restore_restart_service instead" in text, text
    assert "restore_restart_user is deprecated, set restore_restart_become_user instead" in text, text
    assert "restore_connection is deprecated, set the pgops_login_*" in text, text
    assert re.search(r"^\s+restart_service: pg-old-name$", proc.stdout, re.M)
    assert re.search(r"^\s+restart_become_user: pg-old-user$", proc.stdout, re.M)
    doc = subprocess.run([str(BIN / "ansible-doc"), "--json", "pgops.dbrestore.pg_restore_db"], env=ansible_env(),
                         capture_output=True, text=True, check=True)  # fmt: skip
    default = json.loads(doc.stdout)["pgops.dbrestore.pg_restore_db"]["doc"]["options"]["analyze"]["default"]
    assert re.search(rf"^\s+analyze: {str(default).lower()}$", proc.stdout, re.M), proc.stdout


# --- what an operator sees at default verbosity --------------------------------------------------------


def test_no_warnings_at_default_verbosity(pg: PgServer, inventory: Path, hoge_db: str):
    """restore, rollback and clear_sessions with an inventory that has no web group: no [WARNING] line
    (no template for task arguments, no unmatched host pattern, nothing from the modules)."""
    holder = pg.connect("hoge_db")
    try:
        runs = [
            playbook(inventory, "restore", "-e", "db=hoge_db"),
            playbook(inventory, "rollback", "-e", "db=hoge_db"),
            playbook(inventory, "clear_sessions", "-e", "db=hoge_db"),
        ]
    finally:
        holder.close()
    for proc in runs:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "WARNING" in ln]
        assert not lines, "\n".join(lines)
    cleared = report(runs[2])
    assert re.search(r"server [\d.]+: \d+ session\(s\) ended", cleared), cleared
    assert re.search(r"phases: connect \d+ ms.* \(total \d+ ms\)", cleared), cleared


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
    assert fingerprint_db(pg, hoge_db) == before and not [d for d in pg.databases() if d.startswith("hoge_db_prev_")]

    code, answer = trigger(module, "hoge_db")
    assert code == 0 and answer["ok"] and answer["changed"] and answer["dump"] == "hoge_db.2026-11-24.dump"
    assert answer["previous_db"].startswith("hoge_db_prev_")
    # the same dump again restores again (the web trigger is a "reset to the dump" button)
    code, answer = trigger(module, "hoge_db", "hoge_db.2026-11-24.dump")
    assert code == 0 and answer["changed"] and answer["previous_db"].startswith("hoge_db_prev_")


def test_the_dry_run_and_the_restores_get_the_same_options():
    """restore.yml (the dry run) and apply.yml (the restores) each write the restore options out (YAML anchors do not
    cross files): they must stay the same, or the dry run would plan another restore than the one that runs."""
    tasks = ROOT / "roles" / "restore" / "tasks"
    by_file = {}
    for name in ("restore.yml", "apply.yml"):
        module = "pgops.dbrestore.pg_restore_db"
        calls = [t[module] for t in walk_tasks(yaml.safe_load((tasks / name).read_text()))
                 if module in t and "strategy" in t[module]]  # fmt: skip
        assert calls, name
        by_file[name] = [{k: v for k, v in c.items() if k not in ("db", "src", "sanitize", "phase", "progress_dir")}
                         for c in calls]  # fmt: skip
    first = by_file["restore.yml"][0]
    assert len(first) >= 25 and all(c == first for calls in by_file.values() for c in calls)
