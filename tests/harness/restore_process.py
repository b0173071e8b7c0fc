"""restore_database in a process of its own, to be killed, or stopped at a named point of the operation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ansible_collections.pgops.dbrestore.plugins.module_utils.operation import PAUSE_ENV
from tests.harness.pg import PgServer, client_bindir

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = (
    "import sys, json; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
    "from ansible_collections.pgops.dbrestore.plugins.module_utils import postgres, restore as r\n"
    "p = postgres.ConnParams(**json.loads(sys.argv[3]))\n"
    "r.restore_database(p, r.RestoreRequest(**json.loads(sys.argv[4])))\n"
)


def restore_process(pg: PgServer, request: dict, env: dict | None = None) -> subprocess.Popen:
    """RestoreRequest(**request) run by restore_database in a child process (stderr piped, as text)."""
    params = {k: v for k, v in pg.params().__dict__.items() if k != "connect_params"}
    request = {"bindir": str(client_bindir()), **request}
    argv = [sys.executable, "-c", _SCRIPT, str(ROOT), str(ROOT / ".cache" / "collections"), json.dumps(params)]
    return subprocess.Popen([*argv, json.dumps(request)], env=env, stderr=subprocess.PIPE, text=True)


def paused_restore(pg: PgServer, request: dict, point: str, tmp: Path) -> subprocess.Popen:
    """restore_process stopped (SIGSTOP) at the named point; returns once it has stopped there."""
    pid_file = tmp / f"paused-{point}"
    pid_file.unlink(missing_ok=True)
    proc = restore_process(pg, request, env={**os.environ, PAUSE_ENV: f"{point}:{pid_file}"})
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text() and stopped(int(pid_file.read_text()))):
        assert proc.poll() is None, f"the restore ended before reaching {point}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"the restore never reached {point}"
        time.sleep(0.01)
    assert int(pid_file.read_text()) == proc.pid
    return proc


def stopped(pid: int) -> bool:
    """The process stopped itself (state T in /proc): it sits exactly at the named point, and a SIGCONT sent
    now is not lost."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"
