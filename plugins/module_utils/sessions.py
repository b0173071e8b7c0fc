# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Clearing a database of its sessions so it can be dropped, renamed or restored.

Plain typed Python over psycopg 3; pg_terminate_connections is a thin wrapper around
clear_sessions(), and pg_restore_db reuses block/terminate for its switch window.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    ConnParams,
    PgOpsError,
    ServerInfo,
    connect,
    database_exists,
    ident,
    one_line,
    server_info,
    sql,
)

STATES = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
)
BLOCK_METHODS = ("none", "allow_connections", "revoke_connect")
TARGET_STATES = ("terminated", "blocked", "allowed")

# How long a clear database must stay clear: a backend that passed the connection check just
# before the block took effect shows up in pg_stat_activity a moment later.
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


@dataclass(frozen=True)
class RestartSpec:
    """How to restart the server when sessions cannot be terminated (old server, no privilege)."""

    service: str | None = None  # systemd unit or init script name
    pg_ctl: str | None = None  # path of pg_ctl, used with data_dir
    data_dir: str | None = None
    command: tuple[str, ...] = ()  # explicit argv, used as is
    become_user: str | None = None  # run as this user (sudo -n -u, or runuser when we are root)
    use_sudo: bool = False  # prefix "sudo -n" (root) when no become_user is set
    timeout: int = 120

    def __post_init__(self) -> None:
        if not (self.command or self.service or self.data_dir):
            raise PgOpsError(
                "fallback=restart needs restart_service, restart_data_dir (with pg_ctl) or restart_command"
            )

    def argv(self) -> list[str]:
        if self.command:
            base = list(self.command)
        elif self.service:
            if os.path.isdir("/run/systemd/system"):
                base = ["systemctl", "restart", self.service]
            else:
                base = ["service", self.service, "restart"]
        else:  # data_dir, checked in __post_init__
            base = [self.pg_ctl or "pg_ctl", "restart", "-D", str(self.data_dir), "-m", "fast", "-w"]
            base += ["-t", str(self.timeout)]
        if self.become_user:
            if os.geteuid() == 0:
                return ["runuser", "-u", self.become_user, "--", *base]
            return ["sudo", "-n", "-u", self.become_user, "--", *base]
        if self.use_sudo:
            return ["sudo", "-n", "--", *base]
        return base


def restart_argument_spec() -> dict[str, dict[str, Any]]:
    """The restart fallback options (documented in doc_fragments/restart.py)."""
    return dict(
        fallback=dict(type="str", default="none", choices=["none", "restart"]),
        restart_service=dict(type="str"),
        restart_data_dir=dict(type="path"),
        restart_pg_ctl=dict(type="path", default="pg_ctl"),
        restart_command=dict(type="list", elements="str", default=[]),
        restart_become_user=dict(type="str"),
        restart_sudo=dict(type="bool", default=False),
        restart_timeout=dict(type="int", default=120),
    )


def restart_spec_from_params(p: dict[str, Any]) -> RestartSpec | None:
    if p.get("fallback") != "restart":
        return None
    return RestartSpec(
        service=p["restart_service"],
        pg_ctl=p["restart_pg_ctl"],
        data_dir=p["restart_data_dir"],
        command=tuple(p["restart_command"]),
        become_user=p["restart_become_user"],
        use_sudo=p["restart_sudo"],
        timeout=p["restart_timeout"],
    )


@dataclass
class ClearRequest:
    db: str
    state: str = "terminated"
    block: str = "none"
    block_roles: tuple[str, ...] = ()
    session_filter: SessionFilter = field(default_factory=SessionFilter)
    cancel_first: bool = False
    wait_timeout: float = 30.0
    fallback: str = "none"
    restart: RestartSpec | None = None

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> ClearRequest:
        """From pg_terminate_connections' module parameters."""
        return cls(
            db=p["db"],
            state=p["state"],
            block=p["block_new_connections"],
            block_roles=tuple(p["block_roles"]),
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
        if self.block not in BLOCK_METHODS:
            raise PgOpsError(f"block_new_connections must be one of {list(BLOCK_METHODS)}, not {self.block!r}")
        if self.state == "blocked" and self.block == "none":
            raise PgOpsError("state=blocked needs block_new_connections=allow_connections or revoke_connect")
        if self.fallback not in ("none", "restart"):
            raise PgOpsError(f"fallback must be 'none' or 'restart', not {self.fallback!r}")
        if self.fallback == "restart" and self.restart is None:
            raise PgOpsError("fallback=restart needs restart_service, restart_data_dir or restart_command")


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
    diff: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.terminated)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["count"] = self.count
        return data


class _Phases:
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
    # autovacuum is ended by DROP DATABASE itself; parallel workers follow their leader.
    # Roles without pg_read_all_stats see NULL in most columns of other roles' rows.
    kind = (
        " AND coalesce(a.backend_type, '') NOT IN ('autovacuum worker', 'parallel worker')"
        if info.version_num >= 100000
        else ""
    )
    if info.is_superuser:
        can_signal = "true"
    elif info.version_num < 90200:
        can_signal = "false"
    else:
        via_role = "OR pg_has_role('pg_signal_backend', 'MEMBER')" if info.has_signal_backend_role else ""
        can_signal = (
            "CASE WHEN r.rolsuper OR a.usesysid IS NULL THEN false "
            f"ELSE (pg_has_role(a.usesysid, 'MEMBER') {via_role}) END"
        )
    query = (
        f"SELECT a.{pid}, a.usename, coalesce({app}, ''), host(a.client_addr), {state}, "
        f"to_char(a.backend_start, 'YYYY-MM-DD\"T\"HH24:MI:SS.USOF'), {can_signal} "
        "FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid "
        f"WHERE a.datname = %s AND a.{pid} <> pg_backend_pid(){kind} ORDER BY a.backend_start, 1"
    )
    return [Session(*row) for row in conn.execute(query, (db,)).fetchall()]


def block_status(conn: Any, db: str, roles: Sequence[str]) -> dict[str, bool]:
    """allow_connections: datallowconn; connect_revoked: PUBLIC and every listed role lack CONNECT."""
    row = conn.execute(
        "SELECT d.datallowconn, NOT EXISTS (SELECT 1 FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) g "
        " WHERE g.privilege_type = 'CONNECT' AND (g.grantee = 0 OR g.grantee IN "
        "  (SELECT oid FROM pg_roles WHERE rolname = ANY(%s)))) "
        "FROM pg_database d WHERE d.datname = %s",
        (list(roles), db),
    ).fetchone()
    if row is None:
        raise PgOpsError(f'database "{db}" does not exist')
    return {"allow_connections": bool(row[0]), "connect_revoked": bool(row[1])}


def _is_blocked(status: dict[str, bool], method: str) -> bool:
    if method == "allow_connections":
        return not status["allow_connections"]
    if method == "revoke_connect":
        return status["connect_revoked"]
    return False


def set_blocked(conn: Any, info: ServerInfo, db: str, method: str, roles: Sequence[str], blocked: bool) -> None:
    """Close or reopen the database to new connections with the given method."""
    if method == "allow_connections":
        if not info.has_allow_connections:
            raise PgOpsError(
                f"PostgreSQL {info.version} has no ALTER DATABASE … ALLOW_CONNECTIONS (added in 9.5): "
                "use block_new_connections=revoke_connect"
            )
        stmt = sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
            ident(db), sql.SQL("false" if blocked else "true")
        )
        _run_ddl(conn, stmt, db)
    elif method == "revoke_connect":
        grantees = sql.SQL(", ").join([sql.SQL("PUBLIC"), *(ident(r) for r in roles)])
        verb = "REVOKE CONNECT ON DATABASE {} FROM {}" if blocked else "GRANT CONNECT ON DATABASE {} TO {}"
        _run_ddl(conn, sql.SQL(verb).format(ident(db), grantees), db)


def _run_ddl(conn: Any, stmt: Any, db: str) -> None:
    try:
        conn.execute(stmt)
    except Exception as exc:  # psycopg.Error: privilege or catalog problems, told as one line
        raise PgOpsError(f'cannot change connection rights of database "{db}": {one_line(exc)}') from exc


def terminate_backends(conn: Any, pids: Sequence[int], cancel_first: bool) -> None:
    if cancel_first:
        conn.execute("SELECT pg_cancel_backend(p) FROM unnest(%s::int[]) AS p", (list(pids),))
        time.sleep(POLL_SECONDS)
    conn.execute("SELECT pg_terminate_backend(p) FROM unnest(%s::int[]) AS p", (list(pids),))


# --- a block that outlives us must not --------------------------------------------------------

# Run detached with the PG* variables of our connection: waits for our "done"; if we die first
# (even by SIGKILL) its stdin closes without it, and it reopens the database we had closed.
_GUARD_SCRIPT = r"""
import sys, time
import psycopg
from psycopg import sql
if sys.stdin.buffer.read() == b"done":
    sys.exit(0)
db, method, roles = sys.argv[1], sys.argv[2], sys.argv[3:]
name = sql.Identifier(db)
if method == "allow_connections":
    stmt = sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name)
else:
    who = sql.SQL(", ").join([sql.SQL("PUBLIC"), *(sql.Identifier(r) for r in roles)])
    stmt = sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(name, who)
deadline = time.monotonic() + 300  # the server may be restarting (fallback)
while True:
    try:
        with psycopg.connect(autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                conn.execute(stmt)
        break
    except psycopg.OperationalError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
"""


class BlockGuard:
    """Reopens the database if this process dies while the database is blocked."""

    def __init__(self, params: ConnParams, db: str, method: str, roles: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _GUARD_SCRIPT, db, method, *roles],
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


# --- the whole operation ---------------------------------------------------------------------


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


def restart_server(spec: RestartSpec) -> list[str]:
    """Run the restart command; its output goes to files, as the new postmaster inherits them."""
    argv = spec.argv()
    with tempfile.TemporaryFile("w+") as out:
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                timeout=spec.timeout + 30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PgOpsError(f"restart command {argv} failed: {exc}") from exc
        out.seek(0)
        text = out.read().strip()
    if proc.returncode != 0:
        raise PgOpsError(f"restart command {argv} exited with {proc.returncode}: {text.splitlines()[-1:] or ''}")
    return argv


def _wait_for_server(params: ConnParams, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(params)
        except PgOpsError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def clear_sessions(
    params: ConnParams,
    req: ClearRequest,
    *,
    check_mode: bool = False,
    on_cleared: Callable[[Any], None] | None = None,
) -> ClearResult:
    """Block (optionally), end every matching session of req.db and wait until none is left.

    on_cleared runs on the maintenance connection while the database is still blocked and
    empty (pg_restore_db renames databases there). Whatever this call blocked is re-allowed
    if anything fails, and by a BlockGuard if this process is killed, so the database is
    never left closed by accident.
    """
    phases = _Phases()
    res = ClearResult(block_method=req.block)
    t = time.monotonic()
    conn = connect(params)
    phases.add("connect", t)
    we_blocked = False
    guard: BlockGuard | None = None
    try:
        info = server_info(conn)
        res.server_version = info.version
        if not database_exists(conn, req.db):
            raise PgOpsError(f'database "{req.db}" does not exist on {params.describe()}')
        method = req.block if req.block != "none" else "allow_connections"
        before = block_status(conn, req.db, req.block_roles)
        was_blocked = _is_blocked(before, method)

        if req.state == "allowed":
            res.diff = {"before": {"blocked": was_blocked}, "after": {"blocked": False}}
            res.changed = was_blocked
            if was_blocked and not check_mode:
                t = time.monotonic()
                set_blocked(conn, info, req.db, method, req.block_roles, blocked=False)
                phases.add("unblock", t)
                res.log.append(f'reopened database "{req.db}" to new connections ({method})')
            res.block_method = method
            return res

        matching = [s for s in list_sessions(conn, info, req.db) if req.session_filter.matches(s)]
        stuck = [s for s in matching if not s.can_signal or not info.can_terminate_backends]
        use_restart = bool(stuck) and req.fallback == "restart"
        if stuck and not use_restart:
            raise PgOpsError(privilege_problem(info, req.db, stuck))
        res.method = "restart" if use_restart else ("pg_terminate_backend" if matching else "none")
        ends_blocked = req.state == "blocked"
        already_blocked = _is_blocked(before, req.block)  # False for block "none"
        res.blocked = ends_blocked or already_blocked  # what the call leaves behind when it succeeds
        res.diff = {
            "before": {"blocked": already_blocked, "sessions": len(matching)},
            "after": {"blocked": res.blocked, "sessions": 0},
        }
        if check_mode:
            res.terminated = [s.report() for s in matching]
            res.changed = bool(matching) or (ends_blocked and not already_blocked)
            if use_restart:
                res.restart_command = req.restart.argv() if req.restart else []
            res.log.append(f'check mode: would end {len(matching)} session(s) on "{req.db}" with {res.method}')
            return res

        if req.block != "none" and not already_blocked:
            guard = BlockGuard(params, req.db, req.block, req.block_roles)
            t = time.monotonic()
            set_blocked(conn, info, req.db, req.block, req.block_roles, blocked=True)
            we_blocked = True
            res.changed = True
            phases.add("block", t)
            res.log.append(f'blocked new connections to "{req.db}" ({req.block})')

        if use_restart:
            t = time.monotonic()
            conn.close()
            res.terminated = [s.report() for s in matching]
            res.restart_command = restart_server(req.restart)  # type: ignore[arg-type]
            res.restarted = True
            res.changed = True
            conn = _wait_for_server(params, req.wait_timeout)
            phases.add("restart", t)
            res.log.append(f"restarted PostgreSQL with {' '.join(res.restart_command)} ({phases.ms['restart']} ms)")

        t = time.monotonic()
        ended = _terminate_until_clear(conn, info, req, res)
        phases.add("terminate", t)
        if ended:
            res.log.append(f'terminated {ended} session(s) on "{req.db}" in {phases.ms["terminate"]} ms')

        if on_cleared is not None:
            t = time.monotonic()
            on_cleared(conn)
            phases.add("on_cleared", t)

        if we_blocked and not ends_blocked:
            t = time.monotonic()
            set_blocked(conn, info, req.db, req.block, req.block_roles, blocked=False)
            we_blocked = False
            phases.add("unblock", t)
            res.log.append(f'reopened "{req.db}" to new connections')
        return res
    except BaseException as exc:
        if we_blocked:
            _reopen_after_failure(conn, params, req)
        if isinstance(exc, PgOpsError):
            exc.details.update(changed=res.changed, terminated=res.terminated, remaining=res.remaining)
        raise
    finally:
        if guard is not None:
            guard.release()
        res.elapsed_ms = phases.total()
        conn.close()


def _terminate_until_clear(conn: Any, info: ServerInfo, req: ClearRequest, res: ClearResult) -> int:
    """Terminate matching sessions until none is left for SETTLE_SECONDS, or fail at wait_timeout."""
    deadline = time.monotonic() + req.wait_timeout
    seen: dict[tuple[int, str | None], Session] = {}
    try:
        return _terminate_loop(conn, info, req, res, deadline, seen)
    finally:
        # recorded even when the loop fails, so the caller sees what was already ended
        res.terminated.extend(s.report() for s in seen.values())
        res.changed = res.changed or bool(seen)


def _terminate_loop(
    conn: Any, info: ServerInfo, req: ClearRequest, res: ClearResult, deadline: float, seen: dict[Any, Session]
) -> int:
    quiet_since: float | None = None
    while True:
        sessions = [s for s in list_sessions(conn, info, req.db) if req.session_filter.matches(s)]
        now = time.monotonic()
        if not sessions:
            quiet_since = quiet_since or now
            if now - quiet_since >= SETTLE_SECONDS:
                break
            time.sleep(POLL_SECONDS)
            continue
        quiet_since = None
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
        time.sleep(POLL_SECONDS)
    return len(seen)


def _reopen_after_failure(conn: Any, params: ConnParams, req: ClearRequest) -> None:
    """Best effort: a failed call must not leave the database closed (a fresh connection if needed)."""
    for attempt in (conn, None):
        try:
            c = attempt if attempt is not None and not attempt.closed else connect(params)
            set_blocked(c, server_info(c), req.db, req.block, req.block_roles, blocked=False)
            if c is not conn:
                c.close()
            return
        except Exception:  # noqa: BLE001 - the original error is the one to report
            continue
