# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A block that outlives us must not: a detached watcher gives back what we closed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import SAFE_SEARCH_PATH, ConnParams

# Run detached with the PG* variables of our connection: waits for our "done"; if we die first
# (even by SIGKILL) its stdin closes without it, and it runs the reopen statements it was given
# (rendered by the block method, so the guard knows no method of its own).
_GUARD_SCRIPT = r"""
import sys, time
import psycopg
if sys.stdin.buffer.read() == b"done":
    sys.exit(0)
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


class BlockGuard:
    """Reopens db (whatever database holds that name then) if this process dies before release()."""

    def __init__(self, params: ConnParams, db: str, reopen: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _GUARD_SCRIPT, SAFE_SEARCH_PATH.replace(" ", ""), db, *reopen],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=params.tool_env(),
            cwd="/",
            start_new_session=True,  # outlives a kill of our process group
        )

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
