# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The switch window's parts, shared by swap, rollback and the phases of a set.

Closing and clearing the live database (behind paused PgBouncers), the renames in one retried
transaction, logical replication handed over, standbys followed, and the SQL that undoes a
switch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import (
    BlockMethod,
    BlockState,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.copies import (
    undone_name,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.logical import (
    HandOver,
    Recreate,
    slots_of,
    subscriptions_of,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.operation import Operation, pause_point
from ansible_collections.pgops.dbrestore.plugins.module_utils.pooler import Pause
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    OBJECT_IN_USE,
    PgOpsError,
    ServerInfo,
    database_oid,
    execute,
    ident,
    sql,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import (
    ClearRequest,
    ClearResult,
    Closure,
    SessionFilter,
    clear_sessions,
    list_sessions,
    terminate_backends,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.standbys import Follow, switch_lsn

EXIT_GRACE_SECONDS = 0.05  # behind a paused PgBouncer: how long its closed server connections get to go away
AUTOVACUUM_EXIT_SECONDS = 1.0  # for the workers we ended; one still there is left to the rename


def rename(conn: Any, old: str, new: str, res: Any) -> None:
    execute(conn, sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(old), ident(new)), f'cannot rename "{old}"')
    res.renamed.append(f"{old} -> {new}")


def end_autovacuum(conn: Any, info: ServerInfo, dbs: Sequence[str]) -> list[int]:
    """End the autovacuum workers in the databases about to be renamed, wait until they are gone; their pids.

    The rename ends them itself, but then sleeps 100 ms before it looks again, inside the window the app
    sees. Only a superuser may signal them; for any other login role the rename does it as before.
    """
    if not info.is_superuser or info.version_num < 100000:  # backend_type: 10+
        return []
    where = "FROM pg_catalog.pg_stat_activity WHERE backend_type = 'autovacuum worker' AND datname = ANY(%s)"
    ended = [int(r[0]) for r in conn.execute("SELECT pid " + where, (list(dbs),)).fetchall()]
    if not ended:
        return []
    conn.execute("SELECT pg_catalog.pg_terminate_backend(p) FROM pg_catalog.unnest(%s::int[]) p", (ended,))
    deadline = time.monotonic() + AUTOVACUUM_EXIT_SECONDS
    while conn.execute("SELECT count(*) " + where, (list(dbs),)).fetchone()[0] and time.monotonic() < deadline:
        time.sleep(0.002)
    return ended


def in_transaction_retrying(conn: Any, op: Operation, renaming: Sequence[str], body: Callable[[], None],
                            attempts: int = 5) -> None:  # fmt: skip
    """Run body, which renames the databases `renaming` (live first), in one transaction; a backend that
    slipped in before the block (55006) is ended and we retry."""
    db = renaming[0]
    autovacuum = end_autovacuum(conn, op.info, renaming)
    if autovacuum:
        op.res.log.append(f"switch: ended autovacuum worker(s) {autovacuum} before the renames (the server "
                          "would have waited 100 ms for them)")  # fmt: skip
    for attempt in range(attempts):
        renamed = len(op.res.renamed)
        try:
            with conn.transaction():
                body()
            return
        except PgOpsError as exc:
            del op.res.renamed[renamed:]  # rolled back
            if exc.sqlstate != OBJECT_IN_USE or attempt == attempts - 1:
                raise
            late = [s.pid for s in list_sessions(conn, op.info, db)]
            if late:
                terminate_backends(conn, late, cancel_first=False)
            time.sleep(0.05)


def close_and_clear(
    op: Operation, method: BlockMethod, then: Callable[[Any, Closure | None], None], spare_app: str = "",
    paused: bool = False,
) -> None:  # fmt: skip
    """The only window the app sees: close and clear the live database, run `then` while it is empty.

    spare_app: the application_name of our own session into the live database (keep_tables), left alone.
    paused: the PgBouncers of pgbouncers are paused for the window (once all else is ready), resumed after it.
    """
    req = op.req
    spare = SessionFilter(exclude_application_names=(spare_app,)) if spare_app else SessionFilter()
    request = ClearRequest(db=req.db, state="blocked", block=method.name, wait_timeout=req.wait_timeout,
                           fallback=req.fallback, restart=req.restart, record_block=False,
                           session_filter=spare)  # fmt: skip
    pause = Pause(req.pgbouncers, req.pgbouncer_pause_timeout, req.pgbouncer_fallback, log=op.res.log,
                  warnings=op.res.warnings) if paused and req.pgbouncers else None  # fmt: skip
    if pause is not None:  # the backends of PgBouncer's server connections, closed by PAUSE, exit by themselves
        request.exit_grace = EXIT_GRACE_SECONDS
    t = time.monotonic()
    try:
        cleared = clear_sessions(op.params, request, on_cleared=then,
                                 hold=(lambda: _held(pause)) if pause else None)  # fmt: skip
    except PgOpsError as exc:  # what it did before failing (sessions already ended) is part of our result
        op.res.terminated += exc.details.get("terminated", [])
        op.res.log += [f"switch: {line}" for line in exc.details.get("log", [])]
        raise
    finally:
        op.res.switch_window_ms = int((time.monotonic() - t) * 1000)
        if pause is not None:
            op.res.pgbouncer_pause_ms = pause.pause_ms
            op.res.pgbouncers = [r.as_dict() for r in pause.reports]
            op.res.pgbouncer_window_ms = {**pause.window_ms, **op.res.pgbouncer_window_ms}
        else:
            op.res.pgbouncer_window_ms = {}
    if pause is not None and pause.pause_ms:
        w = op.res.pgbouncer_window_ms
        w.update(close=cleared.elapsed_ms.get("block", 0), terminate=cleared.elapsed_ms.get("terminate", 0))
        w["other"] = max(0, pause.pause_ms - sum(w.values()))
        w["total"] = pause.pause_ms
        op.res.log.append("switch: PgBouncer paused " + ", ".join(f"{k} {v} ms" for k, v in w.items()))
    record_clear(op, cleared)


@contextmanager
def _held(pause: Pause) -> Iterator[None]:
    with pause.held():
        pause_point("pgbouncer-paused")  # no pooled session left, nothing switched yet: the guard's moment
        yield


class Logical:
    """The live database's logical replication through the switch (logical_subscriptions, logical_slots)."""

    def __init__(self, op: Operation) -> None:
        self.op = op
        req = op.req
        self.hand = HandOver(op.params, req.db, req.wait_timeout) if req.logical_subscriptions == "hand_over" else None
        self.recreate = Recreate(op.params, op.info, req.db, req.wait_timeout) if req.logical_slots == "recreate" \
            else None  # fmt: skip
        oid = database_oid(op.conn, req.db)
        self.subscriptions = [s.name for s in subscriptions_of(op.conn, oid) if s.enabled or s.slot] \
            if self.hand and oid is not None else []  # fmt: skip
        self.slots = [s.name for s in slots_of(op.conn, op.info, req.db)] if self.recreate else []

    def text(self) -> str:
        out = ""
        if self.subscriptions:
            out += f"; hand the slots of subscriptions {', '.join(self.subscriptions)} to the restored copy"
        if self.slots:
            out += f"; drop the logical slots {', '.join(self.slots)} and create them again on the restored copy"
        return out

    def prepare(self, incoming_oid: int) -> None:
        """Before the window: detach the live subscriptions from their slots (given back if the switch fails)."""
        if self.hand is not None and self.subscriptions:
            try:
                self.hand.prepare(self.op.conn, incoming_oid)
            finally:
                self.op.res.log += self.hand.log
                self.hand.log = []
        if self.recreate is not None:
            self.recreate.prepare(self.op.conn)

    def give_back(self) -> None:
        if self.hand is not None:
            self.hand.give_back()
            self.op.res.log += self.hand.log

    def finish(self, old_db: str) -> None:
        """After the switch: the restored copy takes the slots; the slots of the old copy are made again."""
        res = self.op.res
        try:
            if self.hand is not None:
                self.hand.finish()
                res.log += self.hand.log
            if self.recreate is not None:
                self.recreate.finish(self.op.conn, old_db)
                res.log += self.recreate.log
        finally:
            res.logical = {"subscriptions": self.hand.report if self.hand else [],
                           "slots": self.recreate.report if self.recreate else []}  # fmt: skip


def follow_standbys(op: Operation, old_db: str) -> None:
    """After the switch: each standby replays it, then its sessions on the old copy end (standbys)."""
    req = op.req
    if not op.standbys:
        return
    follow = Follow(op.params, op.standbys, req.standby_timeout)
    try:
        follow.run(switch_lsn(op.conn), old_db, req.db)
    finally:
        op.res.standbys = [r.as_dict() for r in follow.reports]
        op.res.log += follow.log


def standby_text(op: Operation) -> str:
    if not op.standbys:
        return ""
    return (f"; wait for standby(s) {', '.join(s.address for s in op.standbys)} to replay it and end their sessions "
            "on the old copy")  # fmt: skip


def pause_text(op: Operation) -> str:
    n = len(op.req.pgbouncers)
    return f"pause {n} PgBouncer(s), " if n else ""


def record_clear(op: Operation, cleared: ClearResult) -> None:
    if cleared.restarted:
        op.conn.invalidate()
    op.res.terminated += cleared.terminated
    op.res.restarted = op.res.restarted or cleared.restarted
    op.res.log += [f"switch: {line}" for line in cleared.log]


def rollback_sql(op: Operation, method: BlockMethod, live_state: BlockState, prev: str) -> list[str]:
    """The undo of a swap as SQL statements, for a person at psql."""
    db, conn = op.req.db, op.conn
    undone = undone_name(db, "<UTC time>")
    stmts = [
        *method.close_sql(db, live_state),
        sql.SQL("SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE datname = {}")
        .format(sql.Literal(db)),
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(db), ident(undone)),
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(prev), ident(db)),
        *method.open_sql(db, live_state),
    ]  # fmt: skip
    return [s.as_string(conn) + ";" for s in stmts]
