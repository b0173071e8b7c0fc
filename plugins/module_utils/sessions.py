# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ending the sessions on a database so it can be dropped, renamed or restored.

pg_terminate_connections is a thin wrapper around clear_sessions(); pg_restore_db closes and
clears the live database for its switch through the same Closure and terminate loop. Blocking
methods live in blocking.py, the kill guard in guard.py, the restart fallback in restart.py.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import (
    CHOICES as METHOD_CHOICES,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import (
    BlockMethod,
    BlockState,
    best_method,
    block_method,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.guard import BlockGuard
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    ConnParams,
    PgOpsError,
    ServerInfo,
    connect,
    database_oid,
    server_info,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.registry import Registry
from ansible_collections.pgops.dbrestore.plugins.module_utils.restart import (
    FALLBACKS,
    RestartSpec,
    check_restart,
    restart_server,
    restart_spec_from_params,
    wait_for_server,
)

STATES = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
)
BLOCK_CHOICES = ("none", *METHOD_CHOICES)
TARGET_STATES = ("terminated", "blocked", "allowed")

# How long a clear database left open must stay clear: a backend that was logging in shows up in
# pg_stat_activity a moment later (a closed one is checked exactly: _terminate_loop).
SETTLE_SECONDS = 0.15
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Session:
    pid: int
    user: str | None
    application: str
    client: str | None  # address, or None for a unix-socket client
    state: str | None
    backend_start: str | None
    can_signal: bool

    def report(self) -> dict[str, Any]:
        data = asdict(self)
        del data["can_signal"]
        return data


@dataclass(frozen=True)
class SessionFilter:
    """Which sessions of the database to end; empty lists mean "any"."""

    users: tuple[str, ...] = ()
    exclude_users: tuple[str, ...] = ()
    application_names: tuple[str, ...] = ()  # shell-style patterns
    exclude_application_names: tuple[str, ...] = ()
    client_addrs: tuple[str, ...] = ()  # addresses or CIDR networks; "local" = unix socket
    states: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [s for s in self.states if s not in STATES]
        if bad:
            raise PgOpsError(f"unknown session state(s) {bad}; choose from {list(STATES)}")
        for addr in self.client_addrs:
            if addr != "local":
                try:
                    ipaddress.ip_network(addr, strict=False)
                except ValueError as exc:
                    raise PgOpsError(
                        f"client address {addr!r} is neither an address, a CIDR network nor 'local'"
                    ) from exc

    def matches(self, s: Session) -> bool:
        if self.users and s.user not in self.users:
            return False
        if s.user in self.exclude_users:
            return False
        if self.application_names and not any(fnmatch.fnmatchcase(s.application, p) for p in self.application_names):
            return False
        if any(fnmatch.fnmatchcase(s.application, p) for p in self.exclude_application_names):
            return False
        if self.states and s.state not in self.states:
            return False
        return not self.client_addrs or self._client_matches(s.client)

    def _client_matches(self, client: str | None) -> bool:
        if client is None:
            return "local" in self.client_addrs
        addr = ipaddress.ip_address(client.split("/")[0])
        return any(a != "local" and addr in ipaddress.ip_network(a, strict=False) for a in self.client_addrs)


@dataclass
class ClearRequest:
    db: str
    state: str = "terminated"
    block: str = "none"  # "none" or one of blocking.CHOICES
    session_filter: SessionFilter = field(default_factory=SessionFilter)
    cancel_first: bool = False
    wait_timeout: float = 30.0
    fallback: str = "none"
    restart: RestartSpec | None = None
    # state=blocked remembers what it took in our records, so that state=allowed gives exactly that
    # back; a caller that renames the closed database away (the switch) records it itself
    record_block: bool = True
    # sessions already on their way out (PgBouncer closed its server connections at PAUSE): seconds they get
    # to exit on their own before what is left is ended and reported
    exit_grace: float = 0.0
    # how long no session may be seen before a database that is not closed to everyone counts as clear (0: at
    # once, for a caller that retries what it runs on OBJECT_IN_USE, as DROP DATABASE fails cleanly when a
    # session slipped in)
    settle_seconds: float = SETTLE_SECONDS

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> ClearRequest:
        """From pg_terminate_connections' module parameters."""
        return cls(
            db=p["db"],
            state=p["state"],
            block=p["block_new_connections"],
            session_filter=SessionFilter(
                users=tuple(p["users"]),
                exclude_users=tuple(p["exclude_users"]),
                application_names=tuple(p["application_names"]),
                exclude_application_names=tuple(p["exclude_application_names"]),
                client_addrs=tuple(p["client_addrs"]),
                states=tuple(p["session_states"]),
            ),
            cancel_first=p["cancel_first"],
            wait_timeout=p["wait_timeout"],
            fallback=p["fallback"],
            restart=restart_spec_from_params(p),
        )

    def __post_init__(self) -> None:
        if self.state not in TARGET_STATES:
            raise PgOpsError(f"state must be one of {list(TARGET_STATES)}, not {self.state!r}")
        if self.block not in BLOCK_CHOICES:
            raise PgOpsError(f"block_new_connections must be one of {list(BLOCK_CHOICES)}, not {self.block!r}")
        if self.state == "blocked" and self.block == "none":
            raise PgOpsError("state=blocked needs block_new_connections=allow_connections or revoke_connect")
        if self.fallback not in FALLBACKS:
            raise PgOpsError(f"fallback must be one of {list(FALLBACKS)}, not {self.fallback!r}")
        if self.fallback == "restart" and self.restart is None:
            raise PgOpsError(
                "fallback=restart needs restart_patroni_url, restart_service, restart_data_dir or restart_command"
            )


@dataclass
class ClearResult:
    changed: bool = False
    server_version: str = ""
    method: str = "none"
    terminated: list[dict[str, Any]] = field(default_factory=list)
    remaining: list[dict[str, Any]] = field(default_factory=list)
    blocked: bool = False
    block_method: str = "none"
    restarted: bool = False
    restart_command: list[str] = field(default_factory=list)
    elapsed_ms: dict[str, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    diff: dict[str, Any] = field(default_factory=dict)

    @property
    def terminated_count(self) -> int:
        return len(self.terminated)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["terminated_count"] = self.terminated_count
        return data


class Phases:
    """Wall-clock time per phase, in milliseconds, for results a person can read."""

    def __init__(self) -> None:
        self.ms: dict[str, int] = {}
        self._start = time.monotonic()

    def add(self, name: str, since: float) -> None:
        self.ms[name] = self.ms.get(name, 0) + int((time.monotonic() - since) * 1000)

    def total(self) -> dict[str, int]:
        return {**self.ms, "total": int((time.monotonic() - self._start) * 1000)}


# --- catalog queries -------------------------------------------------------------------------


def list_sessions(conn: Any, info: ServerInfo, db: str) -> list[Session]:
    """Every other backend connected to db, with whether we may signal it."""
    pid = info.pid_column
    if info.version_num >= 90200:
        state = "a.state"
    else:
        state = (
            "CASE a.current_query WHEN '<IDLE>' THEN 'idle' "
            "WHEN '<IDLE> in transaction' THEN 'idle in transaction' ELSE 'active' END"
        )
    app = "a.application_name" if info.version_num >= 90000 else "''"
    # autovacuum is ended by DROP DATABASE itself; parallel workers follow their leader. Roles without
    # pg_read_all_stats see NULL in most columns of other roles' rows, backend_type too: there an autovacuum
    # worker is known by having no role (a backend still logging in has no database yet either).
    kind = (
        " AND coalesce(a.backend_type, '') NOT IN ('autovacuum worker', 'parallel worker') AND a.usesysid IS NOT NULL"
        if info.version_num >= 100000
        else ""
    )
    if info.is_superuser:
        can_signal = "true"
    elif info.version_num < 90200:
        can_signal = "false"
    else:
        via_role = "OR pg_catalog.pg_has_role('pg_signal_backend', 'MEMBER')" if info.has_signal_backend_role else ""
        can_signal = (
            "CASE WHEN r.rolsuper OR a.usesysid IS NULL THEN false "
            f"ELSE (pg_catalog.pg_has_role(a.usesysid, 'MEMBER') {via_role}) END"
        )
    query = (
        f"SELECT a.{pid}, a.usename, coalesce({app}, ''), pg_catalog.host(a.client_addr), {state}, "
        f"pg_catalog.to_char(a.backend_start, 'YYYY-MM-DD\"T\"HH24:MI:SS.USOF'), {can_signal} "
        "FROM pg_catalog.pg_stat_activity a LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.usesysid "
        f"WHERE a.datname = %s AND a.{pid} <> pg_catalog.pg_backend_pid(){kind} ORDER BY a.backend_start, 1"
    )
    return [Session(*row) for row in conn.execute(query, (db,)).fetchall()]


def terminate_backends(conn: Any, pids: Sequence[int], cancel_first: bool) -> None:
    if cancel_first:
        conn.execute("SELECT pg_catalog.pg_cancel_backend(p) FROM pg_catalog.unnest(%s::int[]) AS p", (list(pids),))
        time.sleep(POLL_SECONDS)
    conn.execute("SELECT pg_catalog.pg_terminate_backend(p) FROM pg_catalog.unnest(%s::int[]) AS p", (list(pids),))


def privilege_problem(info: ServerInfo, db: str, blocked_by: list[Session]) -> str:
    """Why we cannot end these sessions and what to configure instead (one paragraph)."""
    fix = "or set fallback=restart with restart_service, restart_data_dir or restart_command"
    if not info.can_terminate_backends:
        return f"PostgreSQL {info.version} has no pg_terminate_backend (added in 8.4): {fix}."
    roles = sorted({s.user or "?" for s in blocked_by})
    grant = (
        f'GRANT pg_signal_backend TO "{info.current_user}"'
        if info.has_signal_backend_role
        else "connect as a superuser (pg_signal_backend exists from 9.6 on)"
    )
    return (
        f'role "{info.current_user}" may not terminate {len(blocked_by)} session(s) of role(s) {", ".join(roles)} '
        f'on database "{db}": it is neither a superuser nor a member of pg_signal_backend or of those roles '
        f"(sessions of superusers can only be ended by a superuser). Fix: {grant}, {fix}."
    )


class Closure:
    """A database closed to new connections by one method, given back exactly as found.

    close() starts a BlockGuard first, so that a process killed while the database is closed
    still gives it back; reopen() gives it back now; release() ends the guard (in a finally).
    """

    def __init__(self, conn: Any, params: ConnParams, db: str, method: BlockMethod) -> None:
        self.params, self.db, self.method = params, db, method
        self.state = method.snapshot(conn, db)
        self.taken = False
        self.guard: BlockGuard | None = None

    def arm(self, conn: Any) -> None:
        """Start the guard (a child process: slow enough to be worth starting before a window)."""
        if self.guard is None and not self.state.closed:
            reopen = [stmt.as_string(conn) for stmt in self.method.open_sql(self.db, self.state)]
            self.guard = BlockGuard(self.params, self.db, reopen)

    def close(self, conn: Any) -> bool:
        """Close the database; False when it was closed already (then nothing is taken or given back)."""
        if self.state.closed:
            return False
        self.arm(conn)
        self.method.close(conn, self.db, self.state)
        self.taken = True
        if not self.method.snapshot(conn, self.db).closed:
            raise PgOpsError(
                f'"{self.db}" is still open after {self.method.name}: some CONNECT grants were made by another '
                "grantor than its owner; revoke them, or use block_new_connections=allow_connections"
            )
        return True

    def reopen(self, conn: Any) -> None:
        if self.taken:
            self.method.open(conn, self.db, self.state)
            self.taken = False

    def reopen_quietly(self) -> None:
        """After a failure: give back what was taken on a fresh connection (the original error is what counts)."""
        if not self.taken:
            return
        try:
            with connect(self.params) as conn:
                self.reopen(conn)
        except Exception:  # noqa: BLE001 - the guard retries when released without "done"
            pass

    def release(self, done: bool = True) -> None:
        """End the guard: done=True when the state now is the intended one."""
        if self.guard is not None:
            if done:
                self.guard.release()
            else:
                self.guard.abandon()
            self.guard = None


def clear_sessions(
    params: ConnParams,
    req: ClearRequest,
    *,
    check_mode: bool = False,
    on_cleared: Callable[[Any, Closure | None], None] | None = None,
    hold: Callable[[], AbstractContextManager[Any]] | None = None,
) -> ClearResult:
    """Close (optionally), end every matching session of req.db and wait until none is left.

    on_cleared runs on the maintenance connection while the database is still closed and empty
    (pg_restore_db renames databases there). Whatever this call closed is given back if
    anything fails, and by the guard if this process is killed.

    hold: a context (PgBouncer paused) entered once everything is ready (connected, looked up, the
    guard started) right before the database is closed, and left once on_cleared ran; on a failure
    inside it, the database is reopened before it is left.
    """
    phases = Phases()
    res = ClearResult(block_method=req.block)
    t = time.monotonic()
    conn = connect(params)
    phases.add("connect", t)
    closure: Closure | None = None
    failed = False
    try:
        info = server_info(conn)
        res.server_version = info.version
        oid = database_oid(conn, req.db)
        if oid is None:
            raise PgOpsError(f'database "{req.db}" does not exist on {params.describe()}')
        registry = Registry(conn)
        res.warnings += registry.warnings
        if req.state == "allowed":
            _allow(conn, info, registry, oid, req, res, check_mode)
            return res

        matching = [s for s in list_sessions(conn, info, req.db) if req.session_filter.matches(s)]
        stuck = [s for s in matching if not s.can_signal or not info.can_terminate_backends]
        use_restart = bool(stuck) and req.fallback == "restart"
        if stuck and not use_restart:
            raise PgOpsError(privilege_problem(info, req.db, stuck))
        res.method = "restart" if use_restart else ("pg_terminate_backend" if matching else "none")
        if use_restart:  # a restart behind Patroni's back is refused before anything is closed (check mode too)
            check_restart(req.restart)  # type: ignore[arg-type]
        if req.block != "none":
            closure = Closure(conn, params, req.db, block_method(req.block, info))
        already_closed = closure is not None and closure.state.closed
        ends_blocked = req.state == "blocked"
        res.blocked = ends_blocked or already_closed  # what the call leaves behind when it succeeds
        res.diff = {
            "before": {"blocked": already_closed, "sessions": len(matching)},
            "after": {"blocked": res.blocked, "sessions": 0},
        }
        if check_mode:
            res.terminated = [s.report() for s in matching]
            res.changed = bool(matching) or (ends_blocked and not already_closed)
            if use_restart:
                res.restart_command = req.restart.argv() if req.restart else []
            res.log.append(f'check mode: would end {len(matching)} session(s) on "{req.db}" with {res.method}')
            return res

        # what revoke_connect takes must be recorded for state=allowed: a role that cannot record stops here
        remember = closure is not None and ends_blocked and req.record_block and closure.method.name == "revoke_connect"
        if remember:
            registry.ensure()
        if closure is not None:
            closure.arm(conn)  # the guard's child process starts before the window, not in it
        window = hold() if hold is not None else nullcontext()
        with window:
            try:
                if closure is not None:
                    t = time.monotonic()
                    if closure.close(conn):
                        res.changed = True
                        phases.add("block", t)
                        res.log.append(f'closed "{req.db}" to new connections ({req.block})')
                        if remember:
                            registry.set_block(oid, req.db, closure.state)  # type: ignore[union-attr]

                if use_restart:
                    t = time.monotonic()
                    conn.close()
                    res.terminated = [s.report() for s in matching]
                    res.restart_command = restart_server(req.restart)  # type: ignore[arg-type]
                    res.restarted = True
                    res.changed = True
                    conn = wait_for_server(params, req.wait_timeout)
                    phases.add("restart", t)
                    res.log.append(
                        f"restarted PostgreSQL with {' '.join(res.restart_command)} ({phases.ms['restart']} ms)"
                    )

                t = time.monotonic()
                ended = _terminate_until_clear(conn, info, req, res, oid)
                phases.add("terminate", t)
                if ended:
                    res.log.append(f'terminated {ended} session(s) on "{req.db}" in {phases.ms["terminate"]} ms')

                if on_cleared is not None:
                    t = time.monotonic()
                    on_cleared(conn, closure)
                    phases.add("on_cleared", t)
            except BaseException:
                if closure is not None:  # before the hold ends: PgBouncer's clients find it open again
                    closure.reopen_quietly()
                raise

        if closure is not None and closure.taken and not ends_blocked:
            t = time.monotonic()
            closure.reopen(conn)
            phases.add("unblock", t)
            res.log.append(f'reopened "{req.db}" to new connections')
        return res
    except BaseException as exc:
        failed = True
        if closure is not None:
            closure.reopen_quietly()
        if isinstance(exc, PgOpsError):
            exc.details.update(changed=res.changed, terminated=res.terminated, remaining=res.remaining,
                               log=res.log)  # fmt: skip
        raise
    finally:
        if closure is not None:
            closure.release(done=not (failed and closure.taken))
        res.elapsed_ms = phases.total()
        conn.close()


def _allow(conn: Any, info: ServerInfo, registry: Registry, oid: int, req: ClearRequest, res: ClearResult,
           check_mode: bool) -> None:  # fmt: skip
    """state=allowed: give back what an earlier state=blocked took (recorded), or reopen a closed database."""
    method = best_method(info, "allow_connections" if req.block == "none" else req.block)
    res.block_method = method.name
    now = method.snapshot(conn, req.db)
    taken = registry.block(oid)
    if taken is not None and taken.method == method.name:
        give_back = taken
    elif now.closed and method.name == "allow_connections":
        give_back = BlockState(method.name, closed=False)
    elif now.closed:
        raise PgOpsError(
            f'"{req.db}" has no CONNECT grants and no record says which ones pgops.dbrestore took: grant CONNECT '
            "yourself to the roles that should have it (GRANT CONNECT ON DATABASE … TO …)"
        )
    else:
        give_back = None
    res.changed = now.closed and give_back is not None
    res.diff = {"before": {"blocked": now.closed}, "after": {"blocked": False}}
    if res.changed and not check_mode:
        method.open(conn, req.db, give_back)  # type: ignore[arg-type]
        res.log.append(f'reopened database "{req.db}" to new connections ({method.name})')
    if taken is not None and not check_mode:
        registry.clear_block(oid)


def _terminate_until_clear(conn: Any, info: ServerInfo, req: ClearRequest, res: ClearResult, oid: int) -> int:
    """Terminate matching sessions until none is left (and none is logging in), or fail at wait_timeout."""
    deadline = time.monotonic() + req.wait_timeout
    seen: dict[tuple[int, str | None], Session] = {}
    try:
        return _terminate_loop(conn, info, req, res, deadline, seen, oid)
    finally:
        # recorded even when the loop fails, so the caller sees what was already ended
        res.terminated.extend(s.report() for s in seen.values())
        res.changed = res.changed or bool(seen)


def logging_in(conn: Any, oid: int) -> bool:
    """Whether a backend is logging in to the database: from the moment it counts as connected to it until
    its startup commits (by then it shows in pg_stat_activity) it holds RowExclusiveLock on the database."""
    return bool(
        conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'object' AND database = 0 "
            "AND classid = 'pg_catalog.pg_database'::pg_catalog.regclass AND objid = %s "
            "AND mode = 'RowExclusiveLock' AND pid <> pg_catalog.pg_backend_pid())",
            (oid,),
        ).fetchone()[0]
    )


def _terminate_loop(
    conn: Any, info: ServerInfo, req: ClearRequest, res: ClearResult, deadline: float, seen: dict[Any, Session],
    oid: int,
) -> int:  # fmt: skip
    """Closed to everyone (allow_connections), the database is clear as soon as no session is on it and none
    is logging in (read in that order: a login not seen in pg_locks either fails on the closed database or
    had shown in pg_stat_activity already), so a switch waits for nothing more. Otherwise (open, or
    revoke_connect, which superusers pass), or before 10, it must stay clear for req.settle_seconds."""
    exact = req.block == "allow_connections" and info.version_num >= 100000
    poll = POLL_SECONDS / 5 if exact else POLL_SECONDS
    quiet_since: float | None = None
    grace_until = time.monotonic() + req.exit_grace
    while True:
        starting = exact and logging_in(conn, oid)
        sessions = [s for s in list_sessions(conn, info, req.db) if req.session_filter.matches(s)]
        now = time.monotonic()
        if not sessions:
            if exact and not starting:
                break
            quiet_since = quiet_since or now
            if not exact and now - quiet_since >= req.settle_seconds:
                break
            if exact and now > deadline:
                raise PgOpsError(
                    f'a backend kept logging in to "{req.db}" for wait_timeout={req.wait_timeout:g}s although it is '
                    "closed (SELECT * FROM pg_locks WHERE locktype = 'object' shows it): raise wait_timeout"
                )
            time.sleep(poll)
            continue
        quiet_since = None
        if now < grace_until:
            time.sleep(poll)
            continue
        if now > deadline:
            res.remaining = [s.report() for s in sessions]
            raise PgOpsError(
                f'{len(sessions)} session(s) still on "{req.db}" after wait_timeout={req.wait_timeout:g}s '
                f"(pids {', '.join(str(s.pid) for s in sessions[:20])}); clients keep reconnecting: "
                "use block_new_connections, or raise wait_timeout"
            )
        stuck = [s for s in sessions if not s.can_signal]
        if stuck:
            raise PgOpsError(privilege_problem(info, req.db, stuck))
        terminate_backends(conn, [s.pid for s in sessions], req.cancel_first)
        for s in sessions:
            seen.setdefault((s.pid, s.backend_start), s)
        time.sleep(poll)
    return len(seen)
