# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One run of an operation: its context, and the ordered list of named steps it walks.

A strategy inspects the server, then returns its steps. Check mode reports the list; the real
run executes the same list, so the plan and what happens cannot drift apart. A failure keeps
everything done so far in the result (log, phases, what was created, renamed or dropped).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import ConnParams, connect, server_info
from ansible_collections.pgops.dbrestore.plugins.module_utils.progress import Progress, progress_path
from ansible_collections.pgops.dbrestore.plugins.module_utils.registry import (
    PRUNE_WAIT_S,
    Registry,
    acquire_lock,
    wait_for_prune,
)

# Test-only: "<point>:<file>" makes the process write its pid to <file> and stop itself (SIGSTOP)
# at that point (a step's name: right before it), so a test kills it there instead of racing a sleep.
PAUSE_ENV = "PGOPS_DBRESTORE_PAUSE_BEFORE"


@dataclass(frozen=True)
class Step:
    name: str  # the phases_ms key its time adds to, and the point a test may pause at
    text: str  # what it does, for the plan and the log
    run: Callable[[], None]
    changes: bool = True  # whether check mode counts it as a change


class Maintenance:
    """The maintenance connection (login_db) holding the restore lock.

    The restart fallback ends it with every other session: invalidate() makes the next use open
    a new one and take the lock again.
    """

    def __init__(self, params: ConnParams, db: str) -> None:
        self.params, self.db = params, db
        self.conn = connect(params)
        self.locked = False
        self.stale = False

    def lock(self, timeout: float) -> list[str]:
        warnings = acquire_lock(self.conn, self.db, timeout)
        self.locked = True
        wait_for_prune(self.conn, self.db, PRUNE_WAIT_S)  # the last run's old copies are gone first
        return warnings

    def invalidate(self) -> None:
        self.stale = True

    def _current(self) -> Any:
        if self.stale or self.conn.closed or self.conn.broken:
            self.conn.close()
            self.conn = connect(self.params)
            self.stale = False
            if self.locked:
                acquire_lock(self.conn, self.db, 30)
        return self.conn

    def __getattr__(self, name: str) -> Any:  # execute, transaction, adapters, ...
        return getattr(self._current(), name)

    def close(self) -> None:
        self.conn.close()


class Operation:
    """Everything one run needs, passed as one object instead of seven arguments."""

    def __init__(self, params: ConnParams, req: Any, res: Any, check_mode: bool) -> None:
        self.params, self.req, self.res, self.check_mode = params, req, res, check_mode
        self.started = time.monotonic()
        self.conn = Maintenance(params, req.db)
        self.info = server_info(self.conn)
        self.res.server_version = self.info.version
        self.registry = Registry(self.conn)
        self.res.warnings += self.registry.warnings
        self.standbys = tuple(getattr(req, "standbys", ()))  # followed after the switch; discovery may add some
        self.closers: list[Callable[[], None]] = []  # open files and the like, closed by finish()
        progress_dir = getattr(req, "progress_dir", None)
        path = progress_path(progress_dir, req.db) if progress_dir and not check_mode else None
        self.progress = Progress(path, req.db)  # written from the moment the lock is held (restore_database)
        self.finished = False

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        self.progress.phase(name)
        try:
            yield
        finally:
            ms = int((time.monotonic() - t) * 1000)
            self.res.phases_ms[name] = self.res.phases_ms.get(name, 0) + ms

    def walk(self, steps: list[Step]) -> None:
        """Report the steps (check mode) or run them in order."""
        self.res.plan = [s.text for s in steps]
        if self.check_mode:
            self.res.changed = any(s.changes for s in steps)
            if steps:
                self.res.log.append("check mode: would " + "; ".join(self.res.plan))
            return
        for step in steps:
            pause_point(step.name)
            try:
                with self.phase(step.name):
                    step.run()
            finally:  # changed means something is different now, also when a step failed halfway
                self.res.changed = self.res.has_effects()
            self.res.steps_done.append(step.text)

    def finish(self, error: str | None = None) -> None:
        """Close what the run opened and release the lock; the progress file gets the outcome (once)."""
        self.res.phases_ms["total"] = int((time.monotonic() - self.started) * 1000)
        for close in self.closers:
            close()
        self.closers = []
        self.conn.close()  # releases the advisory lock
        if not self.finished:
            self.finished = True
            self.progress.finish(error is not None, {**self.res.as_dict(), "msg": error})
            self.res.warnings += self.progress.warnings


def pause_point(point: str) -> None:
    """Stop here if a test asked for this point (before each step, and a few points inside steps)."""
    wanted = os.environ.get(PAUSE_ENV, "")
    name, _sep, path = wanted.partition(":")
    if name == point and path:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
