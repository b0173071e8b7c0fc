"""A set of shards on two database servers (two inventory hosts), restored all-or-none by pgops.dbrestore.restore.

db1 is the newest major, db2 another server of an older major; both run locally (ansible_connection
local), each with its own backup directory. Every shard holds a generation value: 1 live, 2 in the
dumps. The app must never see shards of two generations.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_check_mode_plans_every_host_then_the_set_switches_everywhere(fleet: dict, tmp_path: Path):
    inv = inventory(tmp_path, fleet)
    code, out = finished(restore_set(inv, "--check"))
    assert code == 0, out
    for host, shard in (("db1", "shard1"), ("db1", "shard2"), ("db2", "shard3")):
        assert f"{host}: {shard}, part of the set shard1, shard2, shard3 on db1, db2" in out, out
    assert generations(fleet) == {"shard1": 1, "shard2": 1, "shard3": 1} and not leftovers(fleet)
    code, out = finished(restore_set(inv))
    assert code == 0, out
    assert generations(fleet) == {"shard1": 2, "shard2": 2, "shard3": 2}
    spread = re.search(r"set shard1, shard2, shard3 on db1, db2: 3 switch\(es\); spread between the first and the "
                       r"last switch (\d+) ms", out)  # fmt: skip
    assert spread, out
    assert int(spread[1]) < 60_000


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
    pid_file = tmp_path / "db2-paused"
    python = tmp_path / "python-db2"  # db2's module processes only: they stop before their switch step
    python.write_text(f'#!/bin/sh\nexport PGOPS_DBRESTORE_PAUSE_BEFORE=switch:{pid_file}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    proc = restore_set(inventory(tmp_path, fleet, db2={"ansible_python_interpreter": str(python)}))
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text() and stopped(int(pid_file.read_text()))):
        assert proc.poll() is None, finished(proc)[1]
        assert time.monotonic() < deadline, "db2 never reached its switch"
        time.sleep(0.05)
    fleet["db2"].sql("DROP DATABASE shard3_pgops_staging")
    os.kill(int(pid_file.read_text()), signal.SIGCONT)
    code, out = finished(proc)
    assert code != 0 and "failed during the switch: every database that had switched was rolled back" in out, out
    assert "(shard1, shard2 here)" in out and 'db2: cannot rename "shard3_pgops_staging"' in out, out
    assert generations(fleet) == {"shard1": 1, "shard2": 1, "shard3": 1}
