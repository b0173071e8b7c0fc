"""A set of shards on two database servers (two inventory hosts), restored all-or-none by pgops.dbrestore.restore.

db1 is the newest major, db2 another server of an older major; both run locally (ansible_connection
local), each with its own backup directory. Every shard holds a generation value: 1 live, 2 in the
dumps. The app must never see shards of two generations: an Octopus-style reader (App) reads every
shard's generation in each request, on connections it keeps open per shard, all through the restore.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql

from tests.conftest import drop_database
from tests.harness.ansible_run import ansible_env
from tests.harness.dumps import make_dump
from tests.harness.pg import PgServer, client_bindir, start_server
from tests.harness.restore_process import stopped
from tests.integration.test_playbooks import login_vars

pytestmark = pytest.mark.newest_major

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
# "shards.md": the page's map of shards to hosts and its command, as written
PAGE = (ROOT / "docs" / "shards.md").read_text()
SHARDS = yaml.safe_load(re.search(r"```yaml\n(.*?)```", PAGE, re.S)[1])["restore_db_hosts"]
COMMAND = shlex.split(re.search(r"```sh\n(.*?)```", PAGE, re.S)[1])


@pytest.fixture(scope="module")
def db2():
    server = start_server(15)
    yield server
    server.destroy()


@pytest.fixture
def fleet(pg: PgServer, db2: PgServer, tmp_path: Path):
    """Live shards at generation 1 on both servers, a generation-2 dump of each in its host's backup directory."""
    servers = {"db1": pg, "db2": db2}
    for shard, host in SHARDS.items():
        server = servers[host]
        server.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(shard)))
        server.sql("CREATE TABLE generation (g int); INSERT INTO generation VALUES (2)", dbname=shard)
        (tmp_path / host).mkdir(exist_ok=True)
        make_dump(server, shard, "custom", tmp_path / host / f"{shard}.dump")
        server.sql("UPDATE generation SET g = 1", dbname=shard)
    yield servers
    for server in servers.values():
        for (name,) in server.sql("SELECT datname FROM pg_database WHERE datname LIKE 'shard%'"):
            drop_database(server, name)


def inventory(tmp_path: Path, servers: dict, **per_host: dict) -> Path:
    hosts = {
        host: {"ansible_connection": "local", "ansible_python_interpreter": sys.executable, **login_vars(server),
               "restore_backup_dir": str(tmp_path / host), "restore_bindir": str(client_bindir()),
               "restore_jobs": 1, "restore_check_space": False, **per_host.get(host, {})}
        for host, server in servers.items()
    }  # fmt: skip
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps({"all": {"vars": {"restore_db_hosts": SHARDS}}, "db": {"hosts": hosts}}))
    return path


def restore_set(inv: Path, *args: str) -> subprocess.Popen:
    """The page's command, on this inventory."""
    assert COMMAND[:3] == ["ansible-playbook", "-i", "inventory"]
    argv = [str(BIN / "ansible-playbook"), "-i", str(inv), *COMMAND[3:]]
    return subprocess.Popen([*argv, *args], env=ansible_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def finished(proc: subprocess.Popen) -> tuple[int, str]:
    out = proc.communicate(timeout=300)[0]
    return proc.returncode, re.sub(r"\s*\n\s+", " ", out)


def generations(servers: dict) -> dict[str, int]:
    return {shard: servers[host].sql("SELECT g FROM generation", dbname=shard)[0][0] for shard, host in SHARDS.items()}


def leftovers(servers: dict) -> list[str]:
    return [name for server in servers.values() for (name,) in server.sql("SELECT datname FROM pg_database")
            if name.startswith("shard") and name not in SHARDS and "_prev_" not in name]  # fmt: skip


class App:
    """An Octopus-style app: each request reads every shard's generation, on one kept connection per shard.

    A request that loses a connection (or cannot open one) fails, as the app's would; one that
    completes is recorded with the generations it read. Requests run back to back in a thread.
    """

    def __init__(self, servers: dict) -> None:
        self.servers = servers
        self.conns: dict[str, psycopg.Connection] = {}
        self.served: list[dict[str, int]] = []
        self.failed = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def request(self) -> dict[str, int] | None:
        read = {}
        try:
            for shard, host in SHARDS.items():
                conn = self.conns.get(shard)
                if conn is None or conn.closed:
                    conn = self.conns[shard] = self.servers[host].connect(shard, connect_timeout=5)
                read[shard] = conn.execute("SELECT g FROM generation").fetchone()[0]
        except psycopg.Error:
            for shard, conn in list(self.conns.items()):
                if conn.broken or conn.closed:
                    conn.close()
                    del self.conns[shard]
            return None
        return read

    def _loop(self) -> None:
        while not self.done.is_set():
            read = self.request()
            if read is None:
                self.failed += 1
                self.done.wait(0.01)
            else:
                self.served.append(read)

    def __enter__(self) -> App:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(30)
        for conn in self.conns.values():
            conn.close()

    def mixed(self) -> list[dict[str, int]]:
        return [read for read in self.served if len(set(read.values())) > 1]


def pause_db2(tmp_path: Path, point: str) -> tuple[dict, Path]:
    """db2's inventory settings that make its module processes stop (SIGSTOP) before the named step."""
    pid_file = tmp_path / f"db2-paused-{point}"
    python = tmp_path / f"python-db2-{point}"
    pause = f"export PGOPS_DBRESTORE_PAUSE_BEFORE={point}:{pid_file}"
    python.write_text(f'#!/bin/sh\n{pause}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return {"ansible_python_interpreter": str(python)}, pid_file


def wait_paused(proc: subprocess.Popen, pid_file: Path) -> int:
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text() and stopped(int(pid_file.read_text()))):
        assert proc.poll() is None, finished(proc)[1]
        assert time.monotonic() < deadline, "db2 never reached its pause point"
        time.sleep(0.05)
    return int(pid_file.read_text())


def wait_switched_on_db1(servers: dict, proc: subprocess.Popen) -> None:
    """Until db1 has switched both its shards (their previous copies exist): db2 has not switched yet."""
    deadline = time.monotonic() + 120
    while len(servers["db1"].sql("SELECT datname FROM pg_database WHERE datname LIKE 'shard%\\_prev\\_%'")) < 2:
        assert proc.poll() is None, finished(proc)[1]
        assert time.monotonic() < deadline, "db1 never switched"
        time.sleep(0.05)


def fresh_request(servers: dict) -> dict[str, int] | None:
    """One request of an app that has just started (no connection yet)."""
    app = App(servers)
    try:
        return app.request()
    finally:
        for conn in app.conns.values():
            conn.close()


def sessions(servers: dict) -> list[tuple]:
    # client sessions only: autovacuum may work in a closed database (it is allowed in), as on a freshly loaded copy
    query = "SELECT datname, pid FROM pg_stat_activity WHERE datname LIKE 'shard_' AND backend_type = 'client backend'"
    return [row for server in servers.values() for row in server.sql(query)]


def all_open(servers: dict) -> bool:
    query = "SELECT datallowconn FROM pg_database WHERE datname LIKE 'shard_'"
    return all(allowed for server in servers.values() for (allowed,) in server.sql(query))


def test_check_mode_plans_every_host_then_the_set_switches_everywhere(fleet: dict, tmp_path: Path):
    inv = inventory(tmp_path, fleet)
    code, out = finished(restore_set(inv, "--check"))
    assert code == 0, out
    for host, shard in (("db1", "shard1"), ("db1", "shard2"), ("db2", "shard3")):
        assert f"{host}: {shard}, part of the set shard1, shard2, shard3 on db1, db2" in out, out
    assert generations(fleet) == {"shard1": 1, "shard2": 1, "shard3": 1} and not leftovers(fleet)
    db2_paused, pid_file = pause_db2(tmp_path, "switch")
    with App(fleet) as app:
        while not app.served:  # the app serves generation 1, its connections open on every shard
            time.sleep(0.01)
        proc = restore_set(inventory(tmp_path, fleet, db2=db2_paused))
        pid = wait_paused(proc, pid_file)
        wait_switched_on_db1(fleet, proc)
        # db1's shards are restored, db2's not yet: no connection is left on any shard and no new one gets in
        assert fresh_request(fleet) is None and not sessions(fleet)
        os.kill(pid, signal.SIGCONT)
        code, out = finished(proc)
        assert code == 0, out
        deadline = time.monotonic() + 30
        while not app.served or app.served[-1] != {"shard1": 2, "shard2": 2, "shard3": 2}:
            assert time.monotonic() < deadline, "the app never read the restored shards"
            time.sleep(0.01)
    assert app.served[0] == {"shard1": 1, "shard2": 1, "shard3": 1} and app.failed > 0 and not app.mixed()
    assert generations(fleet) == {"shard1": 2, "shard2": 2, "shard3": 2} and all_open(fleet)
    spread = re.search(r"set shard1, shard2, shard3 on db1, db2: 3 switch\(es\); spread between the first and the "
                       r"last switch (\d+) ms; closed on every host from the first close to the last reopen (\d+) ms",
                       out)  # fmt: skip
    assert spread, out
    assert int(spread[1]) < 60_000 and int(spread[1]) < int(spread[2])


def test_a_shard_that_fails_to_stage_switches_none_anywhere(fleet: dict, tmp_path: Path):
    (tmp_path / "db2" / "shard3.dump").unlink()
    (tmp_path / "db2" / "shard3.sql").write_text("CREATE TABLE generation (g int);\nSELECT no_such_function();\n")
    code, out = finished(restore_set(inventory(tmp_path, fleet)))
    assert code != 0 and "failed before any database was switched: all staged copies were dropped, on every host" \
        in out and "db2: restore of" in out, out  # fmt: skip
    assert generations(fleet) == {"shard1": 1, "shard2": 1, "shard3": 1} and not leftovers(fleet)


def test_an_unreachable_host_of_the_set_switches_none(fleet: dict, tmp_path: Path):
    unreachable = {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": 1,
                   "ansible_ssh_common_args": "-o ConnectTimeout=2"}  # fmt: skip
    code, out = finished(restore_set(inventory(tmp_path, fleet, db2=unreachable)))
    assert code != 0 and "db2 did not pass the dry run" in out, out
    assert generations(fleet) == {"shard1": 1, "shard2": 1, "shard3": 1} and not leftovers(fleet)


def test_a_host_failing_to_switch_rolls_the_others_back(fleet: dict, tmp_path: Path):
    """db2's switch is held at its start, and its staged copy of shard3 vanishes: that switch fails."""
    db2_paused, pid_file = pause_db2(tmp_path, "switch")  # db2's module processes only
    with App(fleet) as app:
        proc = restore_set(inventory(tmp_path, fleet, db2=db2_paused))
        pid = wait_paused(proc, pid_file)
        wait_switched_on_db1(fleet, proc)
        assert fresh_request(fleet) is None and not sessions(fleet)  # db1 switched, db2 not: no shard is reachable
        fleet["db2"].sql("DROP DATABASE shard3_pgops_staging")
        os.kill(pid, signal.SIGCONT)
        code, out = finished(proc)
        served = len(app.served)
        deadline = time.monotonic() + 30
        while len(app.served) == served:  # reopened: the app serves the old shards again
            assert time.monotonic() < deadline, "the app never got its shards back"
            time.sleep(0.01)
    assert code != 0 and "failed during the switch: every database that had switched was rolled back" in out, out
    assert "(shard1, shard2 here)" in out and 'db2: cannot rename "shard3_pgops_staging"' in out, out
    assert generations(fleet) == {"shard1": 1, "shard2": 1, "shard3": 1} and all_open(fleet)
    assert app.served[-1] == {"shard1": 1, "shard2": 1, "shard3": 1} and not app.mixed()
