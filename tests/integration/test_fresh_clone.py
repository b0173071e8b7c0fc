"""A fresh clone of this repository, alone in a private directory, runs `make demo` on its own.

It clones HEAD (commit first: uncommitted changes are not in the clone). As root the demo's
server runs as another OS user, which cannot enter the 0700 directory the clone is in; the
clone creates its own .venv (pip reuses its download cache) and needs nothing beside it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="needs root: only then does the demo's server run as another OS user that a private clone shuts out",
    ),
    pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None, reason="needs git and make"),
]


def newcomer_env() -> dict[str, str]:
    """The caller's environment without this checkout's venv, Ansible settings or an outer make's flags."""
    venv_bin = str(ROOT / ".venv" / "bin")
    dropped = ("ANSIBLE_", "PGOPS_", "MAKE", "MFLAGS", "PYTEST_", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    return env


def test_make_demo_in_a_fresh_clone_in_a_private_directory(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o700)
    clone = home / "pgops-dbrestore"
    env = newcomer_env()
    subprocess.run(["git", "-c", f"safe.directory={ROOT}", "clone", "--quiet", str(ROOT), str(clone)],
                   env=env, check=True, capture_output=True)  # fmt: skip
    assert not (clone / ".venv").exists() and (clone / "tests" / "data" / "chinook_postgresql.sql").is_file()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700

    proc = subprocess.run(["make", "demo"], cwd=clone, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=1200, check=False)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    out = proc.stdout  # the closing report; pip's warnings go to stderr

    venv_python = clone / ".venv" / "bin" / "python"
    assert venv_python.exists() and not (clone / ".venv").is_symlink()
    assert "$ .venv/bin/ansible-playbook -i " in out and " playbooks/restore.yml -e db=hoge_db\n" in out
    assert "invoice lines in hoge_db now: 2240 (restored from the nightly dump)" in out
    assert re.search(r"\n   switch window: \d+ ms; sessions ended: \d+\n", out), out[-2500:]
    assert "roll back (run with --check just now; it would swap hoge_db_prev_" in out
    assert "playbooks/rollback.yml -e db=hoge_db\n" in out
    assert "Demo finished: hoge_db was restored under a live, reconnecting app" in out
    assert "  .venv/bin/ansible-playbook -i inventory pgops.dbrestore.restore -e db=hoge_db\n" in out
