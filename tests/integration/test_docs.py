"""The docs pages marked "Run by the test suite": their files and commands, run as written.

Each page's `# file:` YAML blocks are written into a fresh work directory and its `sh` blocks run
there in order. Only what cannot be the same on this machine is overridden, with extra vars: the
hosts run locally, and the connection, backup directory, client tools and restart settings point
at the test server.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from psycopg import sql

from tests.conftest import drop_database
from tests.harness.ansible_run import ansible_env
from tests.harness.pg import PgServer, client_bindir
from tests.harness.storm import Storm

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RUN_MARK = "*Run by the test suite.*"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
pytestmark = pytest.mark.newest_major


def pages() -> list[str]:
    return sorted(p.name for p in DOCS.glob("*.md") if RUN_MARK in p.read_text())


def blocks(page: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer((DOCS / page).read_text())]


def test_every_example_is_run_somewhere():
    """A page not run here: each of its code blocks stands as written in a scenario file or a page run here."""
    scenarios = ROOT / "extensions" / "molecule"

    def lines(text: str) -> str:  # indentation aside: a snippet may sit inside a play
        return "\n".join(ln.strip() for ln in text.strip().splitlines() if not ln.startswith("# file: "))

    sources = [lines(p.read_text()) for p in scenarios.rglob("*") if p.is_file() and p.suffix in (".yml", ".py")]
    sources += [lines((DOCS / p).read_text()) for p in pages()]
    for page in sorted(p.name for p in DOCS.glob("*.md")):
        if page == "README.md" or page in pages():
            continue
        for _lang, body in blocks(page):
            example = lines(body)
            assert any(example in text for text in sources), f"{page}: this example is run by no test:\n{example}"


@pytest.fixture
def world(pg: PgServer, dumps, tmp_path: Path):
    """hoge_db and hoge_shard2 (chinook, invoice lines deleted), their dumps, an owner without privileges."""
    backups = tmp_path / "backups"
    backups.mkdir()
    pg.sql("CREATE ROLE app_owner LOGIN PASSWORD 'pw' CREATEDB")
    for db in ("hoge_db", "hoge_shard2"):
        pg.sql(sql.SQL("CREATE DATABASE {} TEMPLATE chinook_source OWNER app_owner").format(sql.Identifier(db)))
        pg.sql("DELETE FROM invoice_line", dbname=db)
        shutil.copy(dumps["chinook"]["custom"], backups / f"{db}.2026-11-24.dump")
    yield backups
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE 'hoge_%'"):
        drop_database(pg, name)
    pg.sql("DROP ROLE app_owner")


def overrides(pg: PgServer, backups: Path, page: str) -> dict:
    conn = pg.module_args()
    extra = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "restore_backup_dir": str(backups),
        "restore_bindir": str(client_bindir()),
        "restore_connection": conn,
    }
    if page == "old-servers.md":
        # no systemd service here: the same fallback through pg_ctl, as the page describes
        conn.update(login_user="app_owner", login_password="pw")
        extra.update(restore_data_dir=str(pg.datadir), restore_pg_ctl=str(pg.bindir / "pg_ctl"),
                     restore_restart_user=pg.os_user or "", restore_restart_sudo=False)  # fmt: skip
    return extra


@pytest.mark.parametrize("page", pages())
def test_page_runs_as_written(pg: PgServer, world: Path, tmp_path: Path, page: str):
    work = tmp_path / "work"
    work.mkdir()
    (work / "playbooks").symlink_to(ROOT / "playbooks")
    extra = tmp_path / "overrides.json"
    extra.write_text(json.dumps(overrides(pg, world, page)))
    # every page builds on restore.md's inventory; its own files replace those of the same name
    files = [b for p in ("restore.md", page) for b in blocks(p) if b[0] == "yaml" and b[1].startswith("# file: ")]
    for _lang, body in files:
        target = work / body.splitlines()[0].removeprefix("# file: ").strip()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)

    superuser = dict(host="127.0.0.1", port=pg.port, dbname="hoge_db", user="postgres", password="pgops-test-secret")
    outputs = []
    with Storm(superuser, clients=4, name="unicorn worker"):  # the app stays connected throughout
        for lang, body in blocks(page):
            if lang != "sh":
                continue
            for cmd in body.strip().splitlines():
                argv = shlex.split(cmd)
                assert argv[0] == "ansible-playbook", f"{page}: unexpected command {cmd!r}"
                argv = [str(Path(sys.executable).parent / argv[0]), *argv[1:], "-e", f"@{extra}"]
                proc = subprocess.run(argv, cwd=work, env=ansible_env(), capture_output=True, text=True,
                                      timeout=600, check=False)  # fmt: skip
                outputs.append((cmd, proc))
    for cmd, proc in outputs:
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"

    invoice_lines = pg.sql("SELECT count(*) FROM invoice_line", dbname="hoge_db")[0][0]
    if page == "rollback.md":
        assert invoice_lines == 0, "the rollback did not bring the old rows back"
    else:
        assert invoice_lines == 2240, f"hoge_db was not restored:\n{outputs[-1][1].stdout}"
    if page == "old-servers.md":
        assert "server restarted" in outputs[-1][1].stdout
        pg.wait_ready()
