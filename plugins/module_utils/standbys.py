# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Streaming standbys that follow the switch.

ALTER DATABASE ... RENAME replays on a physical standby without ending its sessions: a session
opened there before the switch keeps reading the old copy (now <db>_prev_<time>) until it
reconnects. After the switch we wait until each standby has replayed past the switch's WAL
position, then end the sessions there still attached to the old copy; the app's reconnect lands
on the restored one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    QUERY_CANCELED,
    ConnParams,
    PgOpsError,
    connect,
    one_line,
    psycopg,
    server_info,
)

MIN_VERSION_NUM = 100000  # pg_current_wal_lsn, pg_last_wal_replay_lsn
POLL_SECONDS = 0.02


def standbys_argument_spec() -> dict[str, dict[str, Any]]:
    """pg_restore_db's standby options (documented in the module)."""
    return dict(
        standbys=dict(
            type="list",
            elements="dict",
            default=[],
            options=dict(
                host=dict(type="str"),
                port=dict(type="int", default=5432),
                user=dict(type="str"),
                password=dict(type="str", no_log=True),
                application_name=dict(type="str"),
            ),
        ),
        standby_timeout=dict(type="float", default=30),
        discover_standbys=dict(type="bool", default=False),
    )


@dataclass(frozen=True)
class Standby:
    """Where a standby listens; the rest of the connection (login_db, TLS, ...) is the primary's.

    With discover_standbys an entry may name a standby by the application_name it streams with (as
    pg_stat_replication shows it) instead of, or besides, its host; an entry with neither gives the
    port, user and password of every discovered standby no other entry names.
    """

    host: str = ""  # empty: the address pg_stat_replication shows (discover_standbys)
    port: int = 5432
    user: str | None = None  # default: login_user
    password: str | None = None  # default: login_password
    application_name: str = ""

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> Standby:
        return cls(host=p.get("host") or "", port=int(p.get("port") or 5432), user=p.get("user"),
                   password=p.get("password"), application_name=p.get("application_name") or "")  # fmt: skip

    def params(self, primary: ConnParams) -> ConnParams:
        kw = dict(primary.__dict__, login_host=self.host, login_unix_socket="", login_port=self.port)
        if self.user:
            kw["login_user"] = self.user
        if self.password is not None:
            kw["login_password"] = self.password
        return ConnParams(**kw)

    @property
    def address(self) -> str:
        where = f"{self.host}:{self.port}"
        return f"{where} ({self.application_name})" if self.application_name else where


def entry_problems(entries: tuple[Standby, ...], discover: bool) -> list[str]:
    """What is wrong with the standbys entries themselves (before any connection)."""
    if not discover:
        return [
            f"the standbys entry for application_name {s.application_name!r} needs a host, or discover_standbys=true"
            if s.application_name else
            "a standbys entry without host: give its host, or set discover_standbys=true to find the standbys in "
            "pg_stat_replication (the entry then gives their port, user and password)"
            for s in entries if not s.host
        ]  # fmt: skip
    found = []
    if len([s for s in entries if not s.host and not s.application_name]) > 1:
        found.append("more than one standbys entry has neither host nor application_name: keep one (the port, user "
                     "and password of the discovered standbys no entry names)")  # fmt: skip
    names = [s.application_name for s in entries if s.application_name]
    found += [f"two standbys entries for application_name {n!r}: keep one" for n in sorted(set(names))
              if names.count(n) > 1]  # fmt: skip
    return found


# physical standbys streaming from the primary: no logical walsender (its slot is logical), no base backup
_DISCOVER_SQL = (
    "SELECT r.application_name, pg_catalog.host(r.client_addr), r.state FROM pg_catalog.pg_stat_replication r "
    "WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s WHERE s.active_pid = r.pid "
    "AND s.slot_type = 'logical') AND r.state IS DISTINCT FROM 'backup' ORDER BY 1, 2"
)


def discover(conn: Any, version_num: int, entries: tuple[Standby, ...]) -> tuple[tuple[Standby, ...], list[str]]:
    """discover_standbys: the physical standbys pg_stat_replication shows on the primary, each reached at the
    address shown there (or its entry's host) with its entry's port, user and password; entries with a host and
    no application_name are kept as they are. Returns the standbys and the problems found."""
    if version_num < MIN_VERSION_NUM:
        return (), ["discover_standbys needs PostgreSQL 10 or newer on the primary: leave it out"]
    found: list[str] = []
    fixed = [s for s in entries if s.host and not s.application_name]
    named = {s.application_name: s for s in entries if s.application_name}
    default = next((s for s in entries if not s.host and not s.application_name), Standby())
    standbys: list[Standby] = []
    rows = conn.execute(_DISCOVER_SQL).fetchall()
    if any(state is None for _app, _addr, state in rows):
        return (), [
            "the login role cannot read pg_stat_replication (its rows are hidden without superuser or "
            'pg_read_all_stats): GRANT pg_read_all_stats TO "<login_user>", or list the standbys in standbys with '
            "their host and leave discover_standbys out"
        ]
    seen_names = set()
    for app, addr, _state in rows:
        seen_names.add(app)
        entry = named.get(app, default)
        host = entry.host or addr or ""
        if not host:
            found.append(f"standby {app!r} streams over a unix socket (pg_stat_replication shows no address): give "
                         f"its host in a standbys entry with application_name {app!r}")  # fmt: skip
            continue
        standbys.append(Standby(host, entry.port, entry.user, entry.password, app))
    for name in sorted(set(named) - seen_names):
        found.append(f"standby {name!r} of standbys is not streaming from the primary (not in pg_stat_replication): "
                     "start it and let it catch up, or leave its entry out")  # fmt: skip
    known = {(s.host, s.port) for s in standbys}
    standbys += [s for s in fixed if (s.host, s.port) not in known]
    where = [(s.host, s.port) for s in standbys]
    for host, port in sorted({w for w in where if where.count(w) > 1}):
        apps = ", ".join(sorted(s.application_name or "?" for s in standbys if (s.host, s.port) == (host, port)))
        found.append(f"standbys {apps} would all be reached at {host}:{port}: give each its port (or host) in a "
                     "standbys entry with its application_name")  # fmt: skip
    return tuple(standbys), found


def problems(primary: ConnParams, primary_version_num: int, standbys: tuple[Standby, ...]) -> list[str]:
    """What would keep the run from following the standbys (checked before anything is staged)."""
    found: list[str] = []
    if standbys and primary_version_num < MIN_VERSION_NUM:
        return ["standbys needs PostgreSQL 10 or newer on the primary (pg_current_wal_lsn): leave standbys out"]
    for s in standbys:
        try:
            with connect(s.params(primary)) as conn:
                info = server_info(conn)
                may_signal = "%s OR pg_catalog.pg_has_role('pg_signal_backend', 'MEMBER')"
                row = conn.execute(
                    f"SELECT pg_catalog.pg_is_in_recovery(), {may_signal}", (info.is_superuser,)
                ).fetchone()
        except PgOpsError as exc:
            found.append(f"standby {s.address}: {exc}; check standbys (host, port, user, password)")
            continue
        if not row[0]:
            found.append(f"{s.address} in standbys is not a standby (pg_is_in_recovery() is false): leave it out")
        elif not row[1]:
            found.append(
                f'role "{info.current_user}" may not end sessions on the standby {s.address}: GRANT '
                f'pg_signal_backend TO "{info.current_user}" on the primary (or log in as a superuser)'
            )
    return found


@dataclass
class StandbyReport:
    address: str
    application_name: str = ""  # as pg_stat_replication showed it (discover_standbys, or the entry's)
    replayed: bool = False  # replayed past the switch
    lag_bytes: int = 0  # how far behind the switch it was when we first looked
    lag_ms: int = 0  # how long we waited for it to replay past the switch
    sessions_ended: int = 0  # sessions on the old copy ended there
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Follow:
    """Wait for each standby to replay past `lsn`, then end its sessions on the old copy `old_db`."""

    primary: ConnParams
    standbys: tuple[Standby, ...]
    timeout: float
    reports: list[StandbyReport] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def run(self, lsn: str, old_db: str, db: str) -> None:
        for s in self.standbys:
            report = StandbyReport(f"{s.host}:{s.port}", s.application_name)
            self.reports.append(report)
            try:
                self._one(s, report, lsn, old_db)
            except (PgOpsError, psycopg.Error) as exc:
                report.error = one_line(exc)
        failed = [r for r in self.reports if r.error]
        if failed:
            which = "; ".join(f"{r.address}: {r.error}" for r in failed)
            raise PgOpsError(
                f'switched "{db}" on the primary, but not every standby followed ({which}): on each, once it has '
                f"replayed the switch, run SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                f"'{old_db}', or raise standby_timeout",
                sqlstate=QUERY_CANCELED,  # the standby did not replay in time
            )

    def _one(self, s: Standby, report: StandbyReport, lsn: str, old_db: str) -> None:
        started = time.monotonic()
        with connect(s.params(self.primary)) as conn:
            behind = conn.execute(
                "SELECT pg_catalog.pg_wal_lsn_diff(%s::pg_lsn, pg_catalog.pg_last_wal_replay_lsn())", (lsn,)
            ).fetchone()[0]
            report.lag_bytes = max(0, int(behind or 0))
            while not conn.execute("SELECT pg_catalog.pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]:
                if time.monotonic() - started > self.timeout:
                    raise PgOpsError(f"did not replay past the switch ({lsn}) within standby_timeout={self.timeout:g}s")
                time.sleep(POLL_SECONDS)
            report.replayed = True
            report.lag_ms = int((time.monotonic() - started) * 1000)
            ended = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_catalog.pg_backend_pid()",
                (old_db,),
            ).fetchone()[0]
            report.sessions_ended = int(ended)
        self.log.append(
            f"standby {s.address} replayed the switch {report.lag_ms} ms after it ({report.lag_bytes} bytes behind); "
            f'ended {report.sessions_ended} session(s) there on the old copy "{old_db}"'
        )


def switch_lsn(conn: Any) -> str:
    """The primary's WAL position once the switch committed."""
    return str(conn.execute("SELECT pg_catalog.pg_current_wal_lsn()").fetchone()[0])
