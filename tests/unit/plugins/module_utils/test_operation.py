"""operation.py without a server: the test hook that stops a run at a named point, so a test kills it there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ansible_collections.pgops.dbrestore.plugins.module_utils.operation import PAUSE_ENV, pause_point

SCRIPT = (
    "from ansible_collections.pgops.dbrestore.plugins.module_utils.operation import pause_point\n"
    "pause_point('stage')\n"
    "print('after stage', flush=True)\n"
    "pause_point('verify')\n"
    "print('after verify', flush=True)\n"
)


def run(env_value: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop(PAUSE_ENV, None)
    if env_value is not None:
        env[PAUSE_ENV] = env_value
    return subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, text=True)


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_env_name():
    assert PAUSE_ENV == "PGOPS_DBRESTORE_PAUSE_BEFORE"


def test_without_the_variable_nothing_stops(monkeypatch):
    monkeypatch.delenv(PAUSE_ENV, raising=False)
    pause_point("stage")  # returns at once
    proc = run(None)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and out == "after stage\nafter verify\n"


def test_another_point_or_no_file_does_not_stop(tmp_path: Path):
    proc = run(f"switch:{tmp_path / 'pid'}")
    assert proc.communicate(timeout=60)[0] == "after stage\nafter verify\n"
    proc = run("verify")  # no file: not a request
    assert proc.communicate(timeout=60)[0] == "after stage\nafter verify\n"
    assert not (tmp_path / "pid").exists()


def test_stops_at_the_named_point_and_writes_its_pid(tmp_path: Path):
    pid_file = tmp_path / "pid"
    proc = run(f"verify:{pid_file}")
    try:
        deadline = time.monotonic() + 60
        # stopped means: the pid is written and the kernel reports the process as stopped (T)
        while not (pid_file.exists() and pid_file.read_text() and process_state(proc.pid) == "T"):
            assert proc.poll() is None, "the process ended instead of stopping"
            assert time.monotonic() < deadline, "the process did not stop at verify"
            time.sleep(0.01)
        assert int(pid_file.read_text()) == proc.pid
        assert proc.stdout.readline() == "after stage\n"  # it passed stage, and stopped before verify
        proc.send_signal(signal.SIGCONT)
        assert proc.communicate(timeout=60)[0] == "after verify\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
