# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared PostgreSQL connection layer for every module of the collection.

Plain Python (no Ansible import) so tests drive it directly against a real server.
Option names match community.postgresql so existing group_vars and vaults carry over.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:
    import psycopg
    from psycopg import sql

    PSYCOPG_IMPORT_ERROR: str | None = None
except ImportError:  # reported by the module through missing_required_lib
    psycopg = None
    sql = None
    PSYCOPG_IMPORT_ERROR = traceback.format_exc()


# SQLSTATEs the collection branches on (never on message text, which follows lc_messages)
OBJECT_IN_USE = "55006"
LOCK_NOT_AVAILABLE = "55P03"
INSUFFICIENT_PRIVILEGE = "42501"
QUERY_CANCELED = "57014"  # also what our own waits that ran out of time carry
# a role that pins a safe search_path on every connection we open, as pg_dump does since CVE-2018-1058
SAFE_SEARCH_PATH = "pg_catalog, pg_temp"


class PgOpsError(Exception):
    """An error whose message is meant for the operator.

    sqlstate is the server's error code when a statement failed; details become extra result
    keys (a failed operation puts its partial result there: what it did before failing).
    """

    def __init__(self, msg: str, sqlstate: str | None = None, **details: Any) -> None:
        super().__init__(msg)
        self.sqlstate = sqlstate
        self.details = details


def sql_error(exc: BaseException, what: str) -> PgOpsError:
    """A psycopg error as one operator line, keeping its SQLSTATE."""
    return PgOpsError(f"{what}: {one_line(exc)}", sqlstate=getattr(exc, "sqlstate", None))


def postgres_common_argument_spec() -> dict[str, dict[str, Any]]:
    """Connection options shared by every module (documented in doc_fragments/postgres.py)."""
    return dict(
        login_user=dict(type="str", default="postgres", aliases=["login"]),
        login_password=dict(type="str", default="", no_log=True),
        login_host=dict(type="str", default="", aliases=["host"]),
        login_unix_socket=dict(type="str", default="", aliases=["unix_socket"]),
        login_port=dict(type="int", default=5432, aliases=["port"]),
        login_db=dict(type="str", default="postgres", aliases=["maintenance_db"]),
        ssl_mode=dict(
            type="str",
            default="prefer",
            choices=["allow", "disable", "prefer", "require", "verify-ca", "verify-full"],
        ),
        ca_cert=dict(type="str", aliases=["ssl_rootcert"]),
        ssl_cert=dict(type="path"),
        ssl_key=dict(type="path", no_log=False),
        connect_timeout=dict(type="int", default=10),
        connect_params=dict(type="dict", default={}),
    )


@dataclass(frozen=True)
class ConnParams:
    """Where and how to connect; built from module params or by hand in tests."""

    login_user: str = "postgres"
    login_password: str = ""
    login_host: str = ""
    login_unix_socket: str = ""
    login_port: int = 5432
    login_db: str = "postgres"
    ssl_mode: str = "prefer"
    ca_cert: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None
    connect_timeout: int = 10
    connect_params: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ConnParams:
        return cls(
            login_user=params.get("login_user") or "postgres",
            login_password=params.get("login_password") or "",
            login_host=params.get("login_host") or "",
            login_unix_socket=params.get("login_unix_socket") or "",
            login_port=int(params.get("login_port") or 5432),
            login_db=params.get("login_db") or "postgres",
            ssl_mode=params.get("ssl_mode") or "prefer",
            ca_cert=params.get("ca_cert"),
            ssl_cert=params.get("ssl_cert"),
            ssl_key=params.get("ssl_key"),
            connect_timeout=int(params.get("connect_timeout") or 10),
            connect_params=tuple(sorted((str(k), str(v)) for k, v in (params.get("connect_params") or {}).items())),
        )

    def with_db(self, dbname: str) -> ConnParams:
        return ConnParams(**{**self.__dict__, "login_db": dbname})

    def libpq_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for psycopg.connect (the unix socket wins over the host, as in libpq).

        The search_path is pinned: a database's owner can set its own (ALTER DATABASE … SET
        search_path) and plant functions that would otherwise run with our privileges.
        """
        kw: dict[str, Any] = {
            "user": self.login_user,
            "dbname": self.login_db,
            "port": self.login_port,
            "sslmode": self.ssl_mode,
            "connect_timeout": self.connect_timeout,
            "application_name": "pgops.dbrestore",
        }
        host = self.login_unix_socket or self.login_host
        if host:
            kw["host"] = host
        if self.login_password:
            kw["password"] = self.login_password
        for key, value in (("sslrootcert", self.ca_cert), ("sslcert", self.ssl_cert), ("sslkey", self.ssl_key)):
            if value:
                kw[key] = value
        kw.update(dict(self.connect_params))
        pinned = "-c search_path=" + SAFE_SEARCH_PATH.replace(" ", "")
        kw["options"] = f"{kw['options']} {pinned}" if kw.get("options") else pinned
        return kw

    def libpq_env(self) -> dict[str, str]:
        """The same settings as PG* variables, for client tools (pg_restore, psql) run as argv lists."""
        kw = self.libpq_kwargs()
        names = {
            "user": "PGUSER",
            "dbname": "PGDATABASE",
            "port": "PGPORT",
            "sslmode": "PGSSLMODE",
            "connect_timeout": "PGCONNECT_TIMEOUT",
            "host": "PGHOST",
            "password": "PGPASSWORD",
            "sslrootcert": "PGSSLROOTCERT",
            "sslcert": "PGSSLCERT",
            "sslkey": "PGSSLKEY",
            "application_name": "PGAPPNAME",
        }
        return {names[k]: str(v) for k, v in kw.items() if k in names}

    def tool_env(self) -> dict[str, str]:
        """Environment for a child process (pg_restore, psql, the block guard): ours, with our PG* settings only."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(self.libpq_env())
        return env

    def describe(self) -> str:
        """Where we connect, for error messages (never the password)."""
        where = self.login_unix_socket or self.login_host or "default socket"
        return f"{self.login_user}@{where}:{self.login_port}/{self.login_db}"


def report(module: Any, run: Callable[[], Any]) -> None:
    """Run an operation for an AnsibleModule: its result as module output, a PgOpsError as one clear line.

    A failure carries the operation's partial result (log, phases, what was created or dropped)
    and changed=true when anything had been changed before it failed.
    """
    try:
        result = run()
    except PgOpsError as exc:
        out = _module_output(module, {"changed": False, **exc.details})
        module.fail_json(msg=str(exc), sqlstate=exc.sqlstate, **out)
    module.exit_json(**_module_output(module, result.as_dict()))


def _module_output(module: Any, out: dict[str, Any]) -> dict[str, Any]:
    """Warnings become Ansible's own; the diff only with --diff."""
    for warning in out.pop("warnings", []):
        module.warn(warning)
    if not module._diff:
        out.pop("diff", None)
    return out


def require_psycopg() -> None:
    if psycopg is None:
        raise PgOpsError(
            "psycopg (version 3) is required on the host that runs this module: pip install 'psycopg[binary]'"
        )


def connect(params: ConnParams, *, autocommit: bool = True) -> Any:
    """Open a connection, turning libpq's multi-line errors into one clear line."""
    require_psycopg()
    try:
        return psycopg.connect(autocommit=autocommit, **params.libpq_kwargs())
    except psycopg.OperationalError as exc:
        raise PgOpsError(f"cannot connect to PostgreSQL as {params.describe()}: {one_line(exc)}") from exc


def one_line(exc: BaseException) -> str:
    """The most useful single line of a (libpq) error message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return exc.__class__.__name__
    # libpq writes one "connection to server ... failed: cause" line per address tried, then hints.
    causes = [ln for ln in lines if ln.startswith("connection to server") and "failed:" in ln]
    return causes[-1] if causes else lines[0]


@dataclass(frozen=True)
class ServerInfo:
    version_num: int  # e.g. 180001, 100023, 90624
    version: str  # e.g. "18.1"
    is_superuser: bool
    current_user: str

    @property
    def pid_column(self) -> str:
        """pg_stat_activity's backend pid column: procpid before 9.2."""
        return "pid" if self.version_num >= 90200 else "procpid"

    @property
    def can_terminate_backends(self) -> bool:
        """pg_terminate_backend exists from 8.4 on."""
        return self.version_num >= 80400

    @property
    def has_signal_backend_role(self) -> bool:
        """pg_signal_backend exists from 9.6 on."""
        return self.version_num >= 90600


def server_info(conn: Any) -> ServerInfo:
    row = conn.execute(
        "SELECT pg_catalog.current_setting('server_version_num')::int, pg_catalog.current_setting('server_version'),"
        " (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user), current_user"
    ).fetchone()
    return ServerInfo(version_num=row[0], version=row[1].split()[0], is_superuser=bool(row[2]), current_user=row[3])


def ident(name: str) -> Any:
    """A safely quoted identifier (database, role)."""
    return sql.Identifier(name)


def database_oid(conn: Any, dbname: str) -> int | None:
    row = conn.execute("SELECT oid FROM pg_catalog.pg_database WHERE datname = %s", (dbname,)).fetchone()
    return int(row[0]) if row else None


def execute(conn: Any, stmt: Any, what: str, params: Any = None) -> Any:
    """Run one statement; a server error becomes a PgOpsError saying what failed, with its SQLSTATE."""
    try:
        return conn.execute(stmt, params)
    except psycopg.Error as exc:
        raise sql_error(exc, what) from exc
