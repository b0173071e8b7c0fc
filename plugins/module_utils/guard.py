# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What we close must not stay closed if we die: detached watchers give it back.

BlockGuard reopens a database we blocked; ResumeGuard resumes the PgBouncers we paused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import SAFE_SEARCH_PATH, ConnParams

# Run detached with the PG* variables of our connection: waits for our "done"; if we die first
# (even by SIGKILL) its stdin closes without it, and it runs the reopen statements it was given
# (rendered by the block method, so the guard knows no method of its own).
_GUARD_SCRIPT = r"""
import sys, time
if sys.stdin.buffer.read() == b"done":
    sys.exit(0)
import psycopg  # only now: release() waits for this process, so "done" must not wait for the import
search_path, db, statements = sys.argv[1], sys.argv[2], sys.argv[3:]
deadline = time.monotonic() + 300  # the server may be restarting (fallback)
while True:
    try:
        with psycopg.connect(autocommit=True, options="-c search_path=" + search_path) as conn:
            if conn.execute("SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (db,)).fetchone():
                for stmt in statements:
                    conn.execute(stmt)
        break
    except psycopg.OperationalError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
"""


# Resumes PgBouncers: the admin consoles (passwords included) arrive as the first line on stdin, never
# in argv, which other users may read; then it waits for "done" like the block guard. RESUME only where
# SHOW DATABASES says the database is still paused.
_RESUME_SCRIPT = r"""
import json, sys, time
targets = json.loads(sys.stdin.buffer.readline())
if sys.stdin.buffer.read() == b"done":
    sys.exit(0)
import psycopg
deadline = time.monotonic() + 300
def quote(name):
    return '"' + name.replace('"', '""') + '"'
while targets:
    for t in list(targets):
        kw = dict(host=t["host"], port=t["port"], user=t["user"], dbname="pgbouncer",
                  connect_timeout=t["connect_timeout"], application_name="pgops.dbrestore guard")
        if t["password"]:
            kw["password"] = t["password"]
        try:
            with psycopg.connect(autocommit=True, **kw) as conn:
                cur = conn.execute("SHOW DATABASES")
                names = [d.name for d in cur.description]
                rows = [dict(zip(names, r)) for r in cur.fetchall()]
                if any(r["name"] == t["database"] and int(r.get("paused") or 0) for r in rows):
                    conn.execute("RESUME " + quote(t["database"]))
            targets.remove(t)
        except psycopg.Error:
            pass
    if targets:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.5)
"""


class _Guard:
    """A detached child that runs its script's give-back unless it reads "done" before its stdin closes."""

    def __init__(self, argv: list[str], env: dict[str, str] | None, header: bytes = b"") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd="/",
            start_new_session=True,  # outlives a kill of our process group
        )
        if header:
            self.proc.stdin.write(header)  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]

    def release(self) -> None:
        """We are done: whatever state the database is in now is the intended one."""
        try:
            self.proc.stdin.write(b"done")  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
        self.proc.wait()

    def abandon(self) -> None:
        """We failed and could not give the database back ourselves: let the guard do it (it retries)."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass


class BlockGuard(_Guard):
    """Reopens db (whatever database holds that name then) if this process dies before release()."""

    def __init__(self, params: ConnParams, db: str, reopen: Sequence[str]) -> None:
        super().__init__([_GUARD_SCRIPT, SAFE_SEARCH_PATH.replace(" ", ""), db, *reopen], params.tool_env())


class ResumeGuard(_Guard):
    """RESUMEs each PgBouncer target (host, port, user, password, database, connect_timeout) still paused if
    this process dies before release()."""

    def __init__(self, targets: Sequence[dict[str, Any]]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # PGOPTIONS would be refused
        super().__init__([_RESUME_SCRIPT], env, json.dumps(list(targets)).encode() + b"\n")
