# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""PgBouncer in front of the database: PAUSE it around the switch, so its clients wait instead of failing.

In transaction (or statement) pooling, PAUSE <db> on PgBouncer's admin console waits until every
transaction through it has ended, then closes its server connections; clients keep their pooler
connections and their next query waits. The switch then ends no pooled session, and RESUME lets the
waiting queries run on the restored copy. In session pooling a client holds its server connection
for as long as it is connected, so PAUSE would wait for the clients to leave: that is refused, or
that pooler is left out when the user allows the plain switch (pgbouncer_fallback=switch).

RESUME is sent on every path out of the pause: normal end, a failed switch, a PAUSE that did not
finish in time, and (through the guard process of guard.py) a run killed while PgBouncer is paused.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.guard import ResumeGuard
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    QUERY_CANCELED,
    PgOpsError,
    one_line,
    psycopg,
)

FALLBACKS = ("none", "switch")
DEFAULT_PORT = 6432
# the SQLSTATE our pooler errors carry: 08006 connection failure, 57014 query canceled (PAUSE timed out),
# 55000 object not in prerequisite state (session pooling with clients)
CONNECTION_FAILURE = "08006"
PAUSE_TIMED_OUT = QUERY_CANCELED
NOT_PAUSABLE = "55000"
LOGIN_WAIT_SECONDS = 1.0  # how long PAUSE waits for a server login of the pool to finish


def pgbouncers_argument_spec() -> dict[str, dict[str, Any]]:
    """pg_restore_db's PgBouncer options (documented in the module)."""
    return dict(
        pgbouncers=dict(
            type="list",
            elements="dict",
            default=[],
            options=dict(
                host=dict(type="str", required=True),
                port=dict(type="int", default=DEFAULT_PORT),
                user=dict(type="str", default="pgbouncer"),
                password=dict(type="str", default="", no_log=True),
                database=dict(type="str"),
                connect_timeout=dict(type="int", default=5),
            ),
        ),
        pgbouncer_pause_timeout=dict(type="float", default=10),
        pgbouncer_fallback=dict(type="str", default="none", choices=list(FALLBACKS)),
    )


@dataclass(frozen=True)
class Pooler:
    """One PgBouncer's admin console, and the name (alias) the database has there."""

    host: str
    port: int = DEFAULT_PORT
    user: str = "pgbouncer"
    password: str = ""
    database: str = ""  # the alias in PgBouncer's [databases]; empty: the database's own name
    connect_timeout: int = 5

    @classmethod
    def from_params(cls, p: dict[str, Any], db: str) -> Pooler:
        return cls(
            host=p["host"],
            port=int(p.get("port") or DEFAULT_PORT),
            user=p.get("user") or "pgbouncer",
            password=p.get("password") or "",
            database=p.get("database") or db,
            connect_timeout=int(p.get("connect_timeout") or 5),
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def guard_target(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user, "password": self.password,
                "database": self.database, "connect_timeout": self.connect_timeout}  # fmt: skip

    def connect(self) -> Any:
        """The admin console (database "pgbouncer"): no startup options, which PgBouncer would refuse."""
        kw: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": "pgbouncer",
            "connect_timeout": self.connect_timeout,
            "application_name": "pgops.dbrestore",
            "prepare_threshold": None,  # the console speaks the simple protocol only: never prepare a repeated SHOW
        }
        if self.password:
            kw["password"] = self.password
        try:
            return psycopg.connect(autocommit=True, **kw)
        except psycopg.Error as exc:
            raise PgOpsError(
                f"cannot reach the PgBouncer admin console at {self.address} as {self.user}: {one_line(exc)}; check "
                "pgbouncers (host, port, user, password) and that the user is in admin_users of pgbouncer.ini",
                sqlstate=CONNECTION_FAILURE,
            ) from exc


def quote(name: str) -> str:
    """An admin console argument: PgBouncer reads "..." with "" for a quote, as SQL identifiers."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class PoolState:
    known: bool  # the alias is in SHOW DATABASES
    wildcard: bool  # a "*" entry makes aliases on first use
    paused: bool
    pool_mode: str
    held_sessions: int  # session pooling: clients holding a server connection


def inspect(conn: Any, alias: str) -> PoolState:
    dbs = _rows(conn, "SHOW DATABASES")
    mine = [r for r in dbs if r["name"] == alias]
    pools = [r for r in _rows(conn, "SHOW POOLS") if r["database"] == alias]
    default_mode = next((r["value"] for r in _rows(conn, "SHOW CONFIG") if r["key"] == "pool_mode"), "session")
    mode = (mine[0].get("pool_mode") if mine else None) or default_mode
    held = sum(int(r["cl_active"]) for r in pools if (r.get("pool_mode") or mode) == "session")
    return PoolState(known=bool(mine), wildcard=any(r["name"] == "*" for r in dbs),
                     paused=bool(mine and int(mine[0].get("paused") or 0)), pool_mode=mode,
                     held_sessions=held)  # fmt: skip


def _rows(conn: Any, command: str) -> list[dict[str, Any]]:
    cur = conn.execute(command)
    names = [d.name for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def problems(poolers: Sequence[Pooler], fallback: str) -> tuple[list[str], list[str]]:
    """What keeps the poolers from being paused (problems), and what the fallback will leave out (notes)."""
    found: list[str] = []
    notes: list[str] = []
    for p in poolers:
        try:
            with p.connect() as conn:
                state = inspect(conn, p.database)
        except PgOpsError as exc:
            found.append(str(exc))
            continue
        if not state.known and not state.wildcard:
            found.append(f'PgBouncer at {p.address} has no database "{p.database}": set its alias in pgbouncers '
                         "(database), as named in pgbouncer.ini [databases]")  # fmt: skip
        elif state.held_sessions:
            line = (f'PgBouncer at {p.address} pools "{p.database}" in session mode and {state.held_sessions} '
                    "client(s) hold a server connection, so PAUSE would wait for them to disconnect")  # fmt: skip
            if fallback == "switch":
                notes.append(line + "; its clients get the plain switch (pgbouncer_fallback=switch)")
            else:
                found.append(line + ": use pool_mode = transaction for it, or set pgbouncer_fallback=switch to "
                             "switch without pausing it (its clients see their sessions end)")  # fmt: skip
    return found, notes


@dataclass
class PauseReport:
    address: str
    database: str
    paused: bool = False  # PAUSE finished: no server connection of this pool is left
    skipped: str = ""  # why it was left out (fallback, alias not in use yet)
    drain_ms: int = 0  # how long PAUSE waited for running transactions
    resumed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Pause:
    """PAUSE on every pooler (sent together, bounded by timeout), RESUME on every path out.

    Everything that can be done before the pause is: the admin consoles are connected and inspected
    and the guard is started first; RESUME goes over the connection that sent PAUSE. So the clients
    wait only for PAUSE itself, the body (the switch) and one RESUME round trip.
    """

    poolers: Sequence[Pooler]
    timeout: float
    fallback: str = "none"
    reports: list[PauseReport] = field(default_factory=list)
    pause_ms: int = 0
    window_ms: dict[str, int] = field(default_factory=dict)  # where the pause went: pause (drain), resume
    log: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _started: float = 0.0
    _sent: list[Pooler] = field(default_factory=list)
    _conns: dict[int, Any] = field(default_factory=dict)  # id(pooler) -> its admin console, kept for RESUME

    @contextmanager
    def held(self) -> Iterator[None]:
        """PgBouncer paused for the body; resumed after it, whatever happens (the guard covers a kill)."""
        guard = ResumeGuard([p.guard_target() for p in self.poolers])
        ok = False
        try:
            conns = self._prepare()
            self._pause(conns)
            yield
            ok = True
        finally:
            resumed = self._resume()
            for conn in self._conns.values():
                conn.close()
            self._conns = {}
            if resumed:
                guard.release()
            else:  # let the guard keep trying
                guard.abandon()
            if ok and not resumed:
                failed = [r.address for r in self.reports if r.paused and not r.resumed]
                raise PgOpsError(
                    f"switched, but PgBouncer at {', '.join(failed)} could not be resumed (a guard keeps trying for "
                    "5 minutes): run RESUME on its admin console",
                    sqlstate=CONNECTION_FAILURE,
                )

    def _prepare(self) -> list[tuple[Pooler, PauseReport, Any]]:
        """Before the pause: connect to each admin console and decide which pools to pause."""
        conns: list[tuple[Pooler, PauseReport, Any]] = []
        for p in self.poolers:
            report = PauseReport(p.address, p.database)
            self.reports.append(report)
            conn = p.connect()
            self._conns[id(p)] = conn
            state = inspect(conn, p.database)
            if state.held_sessions and self.fallback == "switch":
                report.skipped = f"session pooling with {state.held_sessions} client(s) holding a session"
            elif state.held_sessions:
                raise PgOpsError(problems([p], self.fallback)[0][0], sqlstate=NOT_PAUSABLE)
            elif not state.known:
                report.skipped = "no client uses this database through it yet"
            if report.skipped:
                self.warnings.append(f"PgBouncer at {p.address} was not paused: {report.skipped}")
                continue
            conns.append((p, report, conn))
        return conns

    def _pause(self, conns: list[tuple[Pooler, PauseReport, Any]]) -> None:
        for p, _report, conn in conns:
            _no_login_running(conn, p.database, min(self.timeout, LOGIN_WAIT_SECONDS))
        self._started = time.monotonic()
        for p, _report, conn in conns:
            conn.pgconn.send_query(f"PAUSE {quote(p.database)}".encode())
            self._sent.append(p)
        self._wait(conns)
        self.window_ms["pause"] = int((time.monotonic() - self._started) * 1000)

    def _wait(self, conns: list[tuple[Pooler, PauseReport, Any]]) -> None:
        deadline = self._started + self.timeout
        waiting = list(conns)
        while waiting:
            for item in list(waiting):
                p, report, conn = item
                pgconn = conn.pgconn
                pgconn.consume_input()
                if pgconn.is_busy():
                    continue
                waiting.remove(item)
                error = ""
                while True:
                    result = pgconn.get_result()
                    if result is None:
                        break
                    if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
                        error = (result.error_message or b"").decode(errors="replace").strip()
                if error:
                    raise PgOpsError(f'PAUSE "{p.database}" on PgBouncer at {p.address} failed: {error}')
                report.paused = True
                report.drain_ms = int((time.monotonic() - self._started) * 1000)
                self.log.append(f'paused "{p.database}" on PgBouncer at {p.address} (waited {report.drain_ms} ms '
                                "for running transactions)")  # fmt: skip
            left = deadline - time.monotonic()
            if waiting and left <= 0:
                slow = ", ".join(p.address for p, _r, _c in waiting)
                raise PgOpsError(
                    f"PAUSE did not finish within pgbouncer_pause_timeout={self.timeout:g}s on PgBouncer at {slow}: a "
                    "transaction through it runs longer (SHOW SERVERS on its admin console); nothing was switched and "
                    "PgBouncer was resumed. Raise pgbouncer_pause_timeout or end that transaction",
                    sqlstate=PAUSE_TIMED_OUT,
                )
            if waiting:
                select.select([c.pgconn.socket for _p, _r, c in waiting], [], [], min(left, 0.5))

    def _resume(self) -> bool:
        """RESUME every pooler PAUSE was sent to (a PAUSE still waiting counts); True when all are resumed.

        Where PAUSE finished, RESUME goes over the same console at once; elsewhere (PAUSE still waiting,
        the console lost) over a new connection, after SHOW DATABASES says it is still paused.
        """
        ok = True
        t = time.monotonic()
        for p in self._sent:
            report = next(r for r in self.reports if r.address == p.address and r.database == p.database)
            try:
                conn = self._conns.get(id(p))
                if report.paused and conn is not None and not conn.closed:
                    conn.execute(f"RESUME {quote(p.database)}")
                else:
                    with p.connect() as fresh:
                        if inspect(fresh, p.database).paused:
                            fresh.execute(f"RESUME {quote(p.database)}")
                report.resumed = True
            except (PgOpsError, psycopg.Error) as exc:
                try:  # the kept console failed: one more try on a new one
                    with p.connect() as fresh:
                        if inspect(fresh, p.database).paused:
                            fresh.execute(f"RESUME {quote(p.database)}")
                    report.resumed = True
                except (PgOpsError, psycopg.Error):
                    ok = False
                    self.warnings.append(f"RESUME on PgBouncer at {p.address} failed: {one_line(exc)}")
        if self._sent:
            self.pause_ms = int((time.monotonic() - self._started) * 1000)
            self.window_ms["resume"] = int((time.monotonic() - t) * 1000)
            self.log += [f'resumed "{p.database}" on PgBouncer at {p.address}' for p in self._sent
                         if any(r.resumed for r in self.reports if r.address == p.address)]  # fmt: skip
        self._sent = []
        return ok


def _no_login_running(conn: Any, alias: str, wait: float) -> None:
    """Wait (up to `wait` s) until no server login of the pool is in progress.

    PAUSE closes a server connection still logging in, and PgBouncer counts that as a failed login:
    after RESUME it opens no server connection for server_login_retry (15 s by default), and every
    paused client waits that long. A pool that is growing has a login in progress for a few ms at a
    time; PAUSE is sent once none is.
    """
    deadline = time.monotonic() + wait
    while any(int(r.get("sv_login") or 0) for r in _rows(conn, "SHOW POOLS") if r["database"] == alias):
        if time.monotonic() > deadline:
            return  # PAUSE anyway: RESUME still comes, only later for the clients
        time.sleep(0.002)
