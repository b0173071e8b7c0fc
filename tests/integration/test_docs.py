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
from tests.harness.dumps import make_dump
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
        if page == "README.md" or page in pages() or page in read_by_a_test(page):
            continue
        for _lang, body in blocks(page):
            example = lines(body)
            assert any(example in text for text in sources), f"{page}: this example is run by no test:\n{example}"


def read_by_a_test(page: str) -> list[str]:
    """[page] when it is marked "*Run by tests/....py.*" and that test reads its blocks, by the page's name."""
    mark = re.search(r"^\*Run by (tests/\S+\.py)\.\*$", (DOCS / page).read_text(), re.M)
    test = ROOT / mark.group(1) if mark else None
    return [page] if test and test.is_file() and f'"{page}"' in test.read_text() else []


def test_no_page_runs_a_playbook_by_path():
    """Users run the installed collection's playbooks by name (ansible-playbook pgops.dbrestore.restore), so no
    page, README or playbook comment shows a playbook path of a checkout."""
    texts = [*DOCS.glob("*.md"), ROOT / "README.md", *ROOT.glob("roles/*/README.md"), *ROOT.glob("playbooks/*")]
    by_path = re.compile(r"ansible-playbook\b[^\n`]*?\s(\S*playbooks/\w+\.yml)")
    found = [f"{p.relative_to(ROOT)}: {m.group(1)}" for p in texts for m in by_path.finditer(p.read_text())]
    assert not found, "\n".join(found)


@pytest.fixture
def world(pg: PgServer, dumps, tmp_path: Path):  # dumps: chinook_source exists
    """hoge_db and hoge_shard2 (chinook, invoice lines deleted) owned by app_owner, a role without privileges, as
    are their tables; their dumps; app_owner's own database, the maintenance database of old-servers.md."""
    backups = tmp_path / "backups"
    backups.mkdir()
    pg.sql("CREATE ROLE app_owner LOGIN PASSWORD 'pw' CREATEDB")
    pg.sql("CREATE DATABASE app_owner OWNER app_owner")
    pg.sql("CREATE DATABASE hoge_source TEMPLATE chinook_source OWNER app_owner")
    pg.sql(OWN_TABLES, dbname="hoge_source")
    make_dump(pg, "hoge_source", "custom", tmp_path / "hoge.dump")
    for db in ("hoge_db", "hoge_shard2"):
        pg.sql(sql.SQL("CREATE DATABASE {} TEMPLATE hoge_source OWNER app_owner").format(sql.Identifier(db)))
        pg.sql("DELETE FROM invoice_line", dbname=db)
        shutil.copy(tmp_path / "hoge.dump", backups / f"{db}.2026-11-24.dump")
    yield backups
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE 'hoge_%' OR datname = 'app_owner'"):
        drop_database(pg, name)
    pg.sql("DROP ROLE app_owner")


# The application's role owns its tables (and with them their sequences), as in an application's database.
OWN_TABLES = """DO $$ DECLARE t record; BEGIN
  FOR t IN SELECT schemaname, tablename FROM pg_tables WHERE schemaname = 'public' LOOP
    EXECUTE format('ALTER TABLE %I.%I OWNER TO app_owner', t.schemaname, t.tablename);
  END LOOP;
END $$"""


def overrides(pg: PgServer, backups: Path, page: str) -> dict:
    """What cannot be as the page says on this machine: the server's address, port and password (TCP, whatever
    socket the page names), the backup directory, the client tools, local hosts, the restart settings."""
    extra = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "restore_backup_dir": str(backups),
        "restore_bindir": str(client_bindir()),
        "pgops_login_host": "127.0.0.1",
        "pgops_login_port": pg.port,
        "pgops_login_unix_socket": "",
        "pgops_login_password": "pw" if page == "old-servers.md" else pg.module_args()["login_password"],
        "pgops_ssl_mode": "disable",
    }
    if page == "old-servers.md":
        # no systemd service here: the same fallback through pg_ctl, as the page describes
        extra.update(restore_restart_data_dir=str(pg.datadir), restore_restart_pg_ctl=str(pg.bindir / "pg_ctl"),
                     restore_restart_become_user=pg.os_user or "", restore_restart_sudo=False)  # fmt: skip
    return extra


@pytest.mark.parametrize("page", pages())
def test_page_runs_as_written(pg: PgServer, world: Path, tmp_path: Path, page: str):
    work = tmp_path / "work"
    work.mkdir()
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
                # the installed collection's playbooks, by name, never a path into a checkout
                assert any(re.fullmatch(r"pgops\.dbrestore\.\w+", a) for a in argv), f"{page}: {cmd!r}"
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
        assert "PostgreSQL was restarted" in outputs[-1][1].stdout
        pg.wait_ready()
