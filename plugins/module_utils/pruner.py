# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Old copies are dropped after the run returns, by a detached session the next run waits for.

DROP DATABASE costs what removing the copy's files costs (a checkpoint, then about 0.3 s a GB here), and
nothing waits for it once the restored copy is live. The module closes and clears each copy itself, then
hands the DROP statements to a child started while the dump loaded (Python and psycopg imported, connected,
the prune key of the database held). The module returns as soon as the child said it took them; the next
run of the database (restore, rollback) waits until that key is free (registry.wait_for_prune). A child
that never got ready leaves the drops to the module; one whose DROP fails leaves the copy recorded, and the
next run drops it with the rest beyond keep_previous.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import SAFE_SEARCH_PATH, ConnParams
from ansible_collections.pgops.dbrestore.plugins.module_utils.registry import PRUNE_CLASS

APPLICATION_NAME = "pgops.dbrestore prune"

# Runs with the PG* variables of our connection. The first line on stdin is the statements (JSON); EOF
# instead means nothing to drop. "ready" is written once the connection is known to be alive still, so
# the key is held when the module returns.
_DROP_SCRIPT = r"""
import json, sys
import psycopg
search_path, lock_class, db, app = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with psycopg.connect(autocommit=True, application_name=app, options="-c search_path=" + search_path) as conn:
    conn.execute("SELECT pg_catalog.pg_advisory_lock(%s, pg_catalog.hashtext(%s))", (lock_class, db))
    job = sys.stdin.buffer.readline()
    if not job:
        sys.exit(0)
    conn.execute("SELECT 1")
    sys.stdout.write("ready\n")
    sys.stdout.close()
    for statement in json.loads(job):
        conn.execute(statement)
"""


class BackgroundDrop:
    """The child that drops a run's old copies after it returns."""

    def __init__(self, params: ConnParams, db: str) -> None:
        argv = [_DROP_SCRIPT, SAFE_SEARCH_PATH.replace(" ", ""), str(PRUNE_CLASS), db, APPLICATION_NAME]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=params.tool_env(),
            cwd="/",
            start_new_session=True,  # outlives our process group
        )
        self.handed = False

    def hand(self, statements: Sequence[str]) -> bool:
        """Give the child its statements; False if it cannot take them (then nothing of them ran)."""
        try:
            self.proc.stdin.write(json.dumps(list(statements)).encode() + b"\n")  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            return False
        self.handed = self.proc.stdout.readline() == b"ready\n"  # type: ignore[union-attr]
        self.close()
        return self.handed

    def close(self) -> None:
        """End the child unless it holds statements (the run's closer: a failed run drops nothing)."""
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.stdout.close()  # type: ignore[union-attr]
        if not self.handed:
            self.proc.wait()
