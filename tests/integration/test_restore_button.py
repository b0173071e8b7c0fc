"""The web_host role's restore button (Rack middleware) under puma, driving pgops-restore on a real server.

A browser-like client signs in (its session is a row in the database), presses the button,
follows the progress page until it redirects, and is still signed in, with the dump's data.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import pwd
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import drop_database
from tests.harness.dumps import make_dump
from tests.harness.pg import SUPERUSER, SUPERUSER_PASSWORD, PgServer, client_bindir, free_port
from tests.integration.test_web_trigger import LOCK_CLASS, RUNNER, TRIGGER, waiting_for_the_lock

ROOT = Path(__file__).resolve().parents[2]
BUTTON = ROOT / "roles" / "web_host" / "files" / "pgops_restore_button.rb"
APP = ROOT / "tests" / "app" / "restore_button.ru"
DB = "button_db"
# Debian's puma, ruby-rack and ruby-pg (.ci/run installs them)
pytestmark = pytest.mark.newest_major


class Browser:
    """Cookies, redirects (303 after a POST becomes a GET) and the progress page's meta refresh."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def go(self, path: str, form: dict | None = None, origin: str | None = None) -> tuple[int, str, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers={"Origin": origin or self.base})
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, urllib.parse.urlparse(resp.url).path, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, urllib.parse.urlparse(exc.url).path, exc.read().decode()

    def follow_progress(self, page: tuple[int, str, str], deadline_s: float = 60) -> tuple[int, str, str]:
        """Reload the progress page as it asks (meta refresh) until it sends the browser elsewhere."""
        deadline = time.monotonic() + deadline_s
        while page[1].endswith("/progress"):
            assert page[0] == 200, page
            refresh = re.search(r'<meta http-equiv="refresh" content="(\d+)">', page[2])
            assert refresh, page
            assert time.monotonic() < deadline, page
            time.sleep(int(refresh.group(1)))  # the page's own reload interval
            page = self.go(page[1])
        return page


@pytest.fixture
def site(pg: PgServer, tmp_path: Path):
    """button_db (users' sessions, items) dumped into a backup directory, the web trigger, and the app under puma."""
    pg.sql(f"CREATE DATABASE {DB}")
    with pg.connect(DB) as conn:
        conn.execute("CREATE TABLE sessions (id bigserial PRIMARY KEY, session_id varchar NOT NULL UNIQUE, data text)")
        conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
        conn.execute("INSERT INTO items SELECT generate_series(1, 500)")
    backups = tmp_path / "backups"
    backups.mkdir()
    make_dump(pg, DB, "custom", backups / f"{DB}.nightly.dump")
    config = tmp_path / "pgops-restore.json"
    config.write_text(json.dumps({
        "runas": pwd.getpwuid(os.geteuid()).pw_name, "allowed_dbs": [DB], "backup_dir": str(backups),
        "dump_pattern": "{db}.*", "libdir": str(ROOT / ".cache" / "collections"), "state_dir": str(tmp_path / "state"),
        "connection": pg.module_args(),
        "options": {"bindir": str(client_bindir()), "keep_previous": 0, "keep_tables": ["sessions"],
                    "lock_timeout": 60},
    }))  # fmt: skip
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{pg.port}/{DB}",
        "BUTTON_DB": DB,
        "PGOPS_BUTTON_LIB": str(BUTTON),
        "PGOPS_RESTORE_COMMAND": json.dumps([sys.executable, "-I", "-c", RUNNER, str(TRIGGER), str(config)]),
    }
    log = (tmp_path / "puma.log").open("w")
    server = subprocess.Popen(
        ["puma", "--environment", "production", "-b", f"tcp://127.0.0.1:{port}", "-t", "4:4", str(APP)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "puma.log").read_text()
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", config
    server.terminate()
    server.wait(timeout=30)
    log.close()
    for (name,) in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{DB}%",)):
        drop_database(pg, name)


def test_press_the_button_follow_the_progress_and_stay_signed_in(pg: PgServer, site):
    base, _config = site
    stranger, admin = Browser(base), Browser(base)
    # only a signed-in admin may press it, and only from the site's own pages; nothing starts otherwise
    assert stranger.go("/pgops/restore", {})[0] == 403
    assert admin.go("/login", {"user": "admin"}) == (200, "/", "user=admin items=500\n")
    assert admin.go("/pgops/restore", {}, origin="http://evil.example")[0] == 403
    assert json.loads(admin.go("/pgops/restore/status")[2])["state"] == "none"

    pg.sql("DELETE FROM items WHERE id > 10", dbname=DB)  # the app changed its data since the dump
    assert admin.go("/") == (200, "/", "user=admin items=10\n")
    with pg.connect() as holder:  # the restore waits for this lock: the page shows it waiting
        holder.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, DB))
        page = admin.go("/pgops/restore", {})
        assert page[:2] == (200, "/pgops/restore/progress"), page
        waiting_for_the_lock(pg)
        page = admin.go("/pgops/restore/progress")
        assert page[:2] == (200, "/pgops/restore/progress") and "button_db: starting" in page[2], page
        assert admin.go("/pgops/restore", {})[:2] == (200, "/pgops/restore/progress")  # busy: the same job
    done = admin.follow_progress(page)
    # redirected home, still signed in (its session row was carried over), with the dump's data
    assert done == (200, "/", "user=admin items=500\n")
    status = json.loads(admin.go("/pgops/restore/status")[2])
    assert status["state"] == "done" and status["outcome"]["changed"] is True, status
