# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restoring a live database from a dump without ever risking the live data.

swap (default): restore into a staging database, verify it, then in one short window block
and clear the live database and rename live -> <db>_prev_<UTC time>, staging -> <db> in one
transaction. replace: clear, drop, restore (for hosts without room for two copies), after a
preflight that reads the whole dump. rollback: swap the newest previous copy back.
Plain typed Python; pg_restore_db is a thin wrapper around restore_database().
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.dumpfile import (
    DumpInfo,
    PlainFilter,
    detect_format,
    fingerprint,
    open_plain,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    ConnParams,
    PgOpsError,
    ServerInfo,
    connect,
    database_exists,
    ident,
    one_line,
    psycopg,
    server_info,
    sql,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import (
    ClearRequest,
    ClearResult,
    RestartSpec,
    clear_sessions,
    list_sessions,
    restart_spec_from_params,
    set_blocked,
    terminate_backends,
)

STRATEGIES = ("swap", "replace")
# all: the whole restore; stage/switch split it so a set of databases (shards) is switched only
# when every staged copy verified; abort drops a staged copy
PHASES = ("all", "stage", "switch", "abort")
# first key of the advisory lock, "pgop"; the second is hashtext(<db>)
LOCK_CLASS = 0x70676F70
MARKER_SCHEMA = "pgops_dbrestore"
MARKER_TABLE = "restore_marker"
MAX_BASE_BYTES = 36  # room for "_prev_" + a timestamp within PostgreSQL's 63-byte names
_STAMP = re.compile(r"^\d{8}T\d{9}Z$")


# --- names -----------------------------------------------------------------------------------


def name_base(db: str) -> str:
    """db itself, or a shortened unique stand-in when db leaves no room for a suffix."""
    raw = db.encode()
    if len(raw) <= MAX_BASE_BYTES:
        return db
    head = raw[: MAX_BASE_BYTES - 9].decode("utf-8", errors="ignore")
    return f"{head}_{hashlib.sha1(raw).hexdigest()[:8]}"


def staging_name(db: str) -> str:
    return f"{name_base(db)}_pgops_staging"


def utc_stamp() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"


def previous_name(db: str, stamp: str) -> str:
    return f"{name_base(db)}_prev_{stamp}"


def undone_name(db: str, stamp: str) -> str:
    return f"{name_base(db)}_undone_{stamp}"


def list_previous(conn: Any, db: str) -> list[str]:
    """Previous copies of db, newest first."""
    prefix = f"{name_base(db)}_prev_"
    names = [r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()]
    prevs = [n for n in names if n.startswith(prefix) and _STAMP.match(n[len(prefix) :])]
    return sorted(prevs, key=lambda n: n[len(prefix) :], reverse=True)


# --- request and result ----------------------------------------------------------------------


@dataclass
class RestoreRequest:
    db: str
    src: str | None = None
    strategy: str = "swap"
    rollback: bool = False
    owner: str | None = None
    template: str = "template0"
    encoding: str | None = None
    lc_collate: str | None = None
    lc_ctype: str | None = None
    jobs: int | None = None
    bindir: str | None = None
    restore_args: tuple[str, ...] = ()
    keep_previous: int = 1
    verify_query: str | None = None
    analyze: bool = False
    force: bool = False
    lock_timeout: float = 0
    block: str = "allow_connections"
    block_roles: tuple[str, ...] = ()
    wait_timeout: float = 30
    fallback: str = "none"
    restart: RestartSpec | None = None
    phase: str = "all"

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> RestoreRequest:
        """From pg_restore_db's module parameters."""
        return cls(
            db=p["db"],
            src=os.path.abspath(p["src"]) if p["src"] else None,
            strategy=p["strategy"],
            rollback=p["rollback"],
            owner=p["owner"],
            template=p["template"],
            encoding=p["encoding"],
            lc_collate=p["lc_collate"],
            lc_ctype=p["lc_ctype"],
            jobs=p["jobs"],
            bindir=p["bindir"],
            restore_args=tuple(p["restore_args"]),
            keep_previous=p["keep_previous"],
            verify_query=p["verify_query"],
            analyze=p["analyze"],
            force=p["force"],
            lock_timeout=p["lock_timeout"],
            block=p["block_new_connections"],
            block_roles=tuple(p["block_roles"]),
            wait_timeout=p["wait_timeout"],
            fallback=p["fallback"],
            restart=restart_spec_from_params(p),
            phase=p["phase"],
        )

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise PgOpsError(f"strategy must be one of {list(STRATEGIES)}, not {self.strategy!r}")
        if self.phase not in PHASES:
            raise PgOpsError(f"phase must be one of {list(PHASES)}, not {self.phase!r}")
        if self.phase != "all" and (self.strategy != "swap" or self.rollback):
            raise PgOpsError(f"phase={self.phase} works with strategy=swap only, and not with rollback")
        if not self.rollback and not self.src and self.phase in ("all", "stage"):
            raise PgOpsError("src (the dump to restore) is required unless rollback=true")
        if self.keep_previous < 0:
            raise PgOpsError("keep_previous must be 0 or more")
        if self.block == "none":
            raise PgOpsError(
                "pg_restore_db always blocks the database for its switch: use allow_connections or revoke_connect"
            )


@dataclass
class RestoreResult:
    changed: bool = False
    db: str = ""
    strategy: str = ""
    phase: str = "all"
    format: str = ""
    sha256: str = ""
    server_version: str = ""
    marker_before: dict | None = None
    marker_after: dict | None = None
    staging_db: str = ""
    staged: bool = False  # phase=stage: a verified copy waits for phase=switch
    live_size_bytes: int = 0
    data_directory: str = ""  # empty when the login role may not see it
    previous_db: str = ""
    dropped: list[str] = field(default_factory=list)
    terminated: int = 0
    terminated_sessions: list[dict] = field(default_factory=list)
    restarted: bool = False
    switch_window_ms: int = 0
    phases_ms: dict[str, int] = field(default_factory=dict)
    stripped_statements: list[str] = field(default_factory=list)
    rollback: dict[str, Any] = field(default_factory=dict)
    rollback_sql: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    diff: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Clock:
    def __init__(self, res: RestoreResult) -> None:
        self.res = res
        self.start = time.monotonic()

    def phase(self, name: str) -> _Phase:
        return _Phase(self.res, name)

    def finish(self) -> None:
        self.res.phases_ms["total"] = int((time.monotonic() - self.start) * 1000)


class _Phase:
    def __init__(self, res: RestoreResult, name: str) -> None:
        self.res, self.name = res, name

    def __enter__(self) -> None:
        self.t = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        ms = int((time.monotonic() - self.t) * 1000)
        self.res.phases_ms[self.name] = self.res.phases_ms.get(self.name, 0) + ms


# --- the maintenance connection and its lock ---------------------------------------------------


class _Maintenance:
    """The maintenance connection holding the advisory lock.

    The restart fallback ends it with every other session: invalidate() makes the next use open
    a new one and take the lock again.
    """

    def __init__(self, params: ConnParams, db: str) -> None:
        self.params, self.db = params, db
        self.conn = connect(params)
        self.locked = False
        self.stale = False

    def lock(self, timeout: float) -> None:
        acquire_lock(self.conn, self.db, timeout)
        self.locked = True

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


def acquire_lock(conn: Any, db: str, timeout: float) -> None:
    """Session-level advisory lock per target database; gone with the connection, even on SIGKILL."""
    deadline = time.monotonic() + timeout
    while not conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, db)).fetchone()[0]:
        if time.monotonic() >= deadline:
            row = conn.execute(
                "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
                "AND l.classid::bigint = %s AND l.objid::bigint = (hashtext(%s)::bigint + 4294967296) %% 4294967296",
                (LOCK_CLASS, db),
            ).fetchone()
            holder = f" (held by backend pid {row[0]})" if row else ""
            raise PgOpsError(
                f'another restore of database "{db}" is running{holder}; nothing was changed. '
                "Wait for it, or set lock_timeout to queue behind it"
            )
        time.sleep(0.25)


# --- catalog helpers -------------------------------------------------------------------------


def _default_block(info: ServerInfo, wanted: str) -> str:
    return wanted if wanted != "allow_connections" or info.has_allow_connections else "revoke_connect"


def _execute(conn: Any, stmt: Any, what: str) -> None:
    try:
        conn.execute(stmt)
    except psycopg.Error as exc:
        raise PgOpsError(f"{what}: {one_line(exc)}") from exc


def _rename(conn: Any, old: str, new: str) -> None:
    _execute(conn, sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(old), ident(new)), f'cannot rename "{old}"')


def read_marker(params: ConnParams, db: str) -> dict | None:
    """The marker row of db, or None (no marker, or the database does not accept connections)."""
    try:
        conn = connect(params.with_db(db))
    except PgOpsError:
        return None
    with conn:
        exists = conn.execute("SELECT to_regclass(%s)", (f"{MARKER_SCHEMA}.{MARKER_TABLE}",)).fetchone()[0]
        if exists is None:
            return None
        row = conn.execute(
            sql.SQL(
                "SELECT sha256, format, size, src, to_char(restored_at AT TIME ZONE 'UTC', "
                '\'YYYY-MM-DD"T"HH24:MI:SS"Z"\') FROM {}.{}'
            ).format(ident(MARKER_SCHEMA), ident(MARKER_TABLE))
        ).fetchone()
    if row is None:
        return None
    return dict(zip(("sha256", "format", "size", "src", "restored_at"), row, strict=True))


def write_marker(conn: Any, info: DumpInfo, sha256: str) -> None:
    schema, table = ident(MARKER_SCHEMA), ident(MARKER_TABLE)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.{} (one boolean PRIMARY KEY DEFAULT true CHECK (one), "
            "sha256 text NOT NULL, format text NOT NULL, size bigint NOT NULL, src text NOT NULL, "
            "restored_at timestamptz NOT NULL DEFAULT now(), restored_by text NOT NULL DEFAULT current_user)"
        ).format(schema, table)
    )
    conn.execute(
        sql.SQL("COMMENT ON TABLE {}.{} IS {}").format(
            schema, table, sql.Literal("pgops.dbrestore: the dump this database was restored from")
        )
    )
    # Readable by every role, so that the database owner (not a superuser) can later restore
    # a database a superuser restored before: the marker holds no secrets.
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO PUBLIC").format(schema))
    conn.execute(sql.SQL("GRANT SELECT ON {}.{} TO PUBLIC").format(schema, table))
    conn.execute(sql.SQL("DELETE FROM {}.{}").format(schema, table))
    conn.execute(
        sql.SQL("INSERT INTO {}.{} (sha256, format, size, src) VALUES (%s, %s, %s, %s)").format(schema, table),
        (sha256, info.format, info.size, os.path.basename(info.path.rstrip("/"))),
    )


@dataclass
class DatabaseSettings:
    """Database-level settings that belong to the database, not to its contents."""

    owner: str
    encoding: str
    collate: str
    ctype: str
    acl: list[tuple[str, str, bool]]  # (grantee or "PUBLIC", privilege, grantable); None acl = defaults
    has_acl: bool
    conn_limit: int
    comment: str | None
    role_settings: list[tuple[str | None, str]]  # (role or None for the database, "name=value")


def read_settings(conn: Any, db: str) -> DatabaseSettings:
    row = conn.execute(
        "SELECT pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datcollate, d.datctype, "
        "d.datacl IS NOT NULL, d.datconnlimit, shobj_description(d.oid, 'pg_database'), d.oid "
        "FROM pg_database d WHERE d.datname = %s",
        (db,),
    ).fetchone()
    if row is None:
        raise PgOpsError(f'database "{db}" does not exist')
    acl = conn.execute(
        "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, "
        "a.is_grantable FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = %s",
        (db,),
    ).fetchall()
    role_settings = conn.execute(
        "SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, c "
        "FROM pg_db_role_setting s, unnest(s.setconfig) c WHERE s.setdatabase = %s",
        (row[7],),
    ).fetchall()
    return DatabaseSettings(
        owner=row[0], encoding=row[1], collate=row[2], ctype=row[3], acl=[tuple(a) for a in acl], has_acl=row[4],
        conn_limit=row[5], comment=row[6], role_settings=[tuple(r) for r in role_settings],
    )  # fmt: skip


# GUCs whose stored value is a list of (possibly double-quoted) elements
_LIST_GUCS = {"search_path", "temp_tablespaces", "session_preload_libraries", "local_preload_libraries"}


def _setting_values(name: str, value: str) -> list[str]:
    if name not in _LIST_GUCS:
        return [value]
    return [m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2).strip()
            for m in re.finditer(r'\s*(?:"((?:[^"]|"")*)"|([^,]+))\s*(?:,|$)', value)]  # fmt: skip


def apply_settings(conn: Any, db: str, s: DatabaseSettings, owner: str | None) -> list[str]:
    """Give db the live database's owner, GRANTs, connection limit, comment and ALTER DATABASE SET values."""
    target = ident(db)
    stmts = [sql.SQL("ALTER DATABASE {} OWNER TO {}").format(target, ident(owner or s.owner))]
    if s.has_acl:
        stmts.append(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(target))
        for grantee, priv, grantable in s.acl:
            who = sql.SQL("PUBLIC") if grantee == "PUBLIC" else ident(grantee)
            stmts.append(
                sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                    sql.SQL(priv), target, who, sql.SQL(" WITH GRANT OPTION" if grantable else "")
                )
            )
    if s.conn_limit != -1:
        stmts.append(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(target, sql.Literal(s.conn_limit)))
    if s.comment is not None:
        stmts.append(sql.SQL("COMMENT ON DATABASE {} IS {}").format(target, sql.Literal(s.comment)))
    for role, item in s.role_settings:
        name, _sep, value = item.partition("=")
        guc = sql.Identifier(*name.split("."))
        values = sql.SQL(", ").join(sql.Literal(v) for v in _setting_values(name, value))
        if role is None:
            stmts.append(sql.SQL("ALTER DATABASE {} SET {} = {}").format(target, guc, values))
        else:
            stmts.append(sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} = {}").format(ident(role), target, guc, values))
    for stmt in stmts:
        _execute(conn, stmt, f'cannot carry database settings over to "{db}"')
    return [stmt.as_string(conn) for stmt in stmts]


def create_database(conn: Any, name: str, req: RestoreRequest, live: DatabaseSettings | None) -> None:
    parts = [sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(ident(name), ident(req.template))]
    encoding = req.encoding or (live.encoding if live else None)
    collate = req.lc_collate or (live.collate if live else None)
    ctype = req.lc_ctype or (live.ctype if live else None)
    for key, value in (("ENCODING", encoding), ("LC_COLLATE", collate), ("LC_CTYPE", ctype)):
        if value:
            parts.append(sql.SQL(f"{key} {{}}").format(sql.Literal(value)))
    if req.owner:
        parts.append(sql.SQL("OWNER {}").format(ident(req.owner)))
    _execute(conn, sql.SQL(" ").join(parts), f'cannot create database "{name}"')


def drop_database(params: ConnParams, info: ServerInfo, name: str, wait_timeout: float) -> None:
    """Close, clear and drop a database of our own (staging, previous copy, partial restore)."""

    def drop(conn: Any) -> None:
        _execute(conn, sql.SQL("DROP DATABASE {}").format(ident(name)), f'cannot drop "{name}"')

    clear_sessions(
        params,
        ClearRequest(
            db=name, state="blocked", block=_default_block(info, "allow_connections"), wait_timeout=wait_timeout
        ),
        on_cleared=drop,
    )


# --- running the client tools ----------------------------------------------------------------


def _dies_with_us(argv: list[str]) -> list[str]:
    """Prefix setpriv --pdeathsig so a killed module leaves no orphan tool writing into staging."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


def find_tool(name: str, bindir: str | None) -> str:
    path = os.path.join(bindir, name) if bindir else shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        where = f"in {bindir}" if bindir else "on PATH"
        raise PgOpsError(f"{name} not found {where}: install the PostgreSQL client tools or set bindir")
    return path


def _tail(text: str, lines: int = 3) -> str:
    useful = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(useful[-lines:]) or "no error output"


def _run_tool(argv: list[str], env: dict[str, str], feed: Any = None) -> None:
    """Run a client tool as an argv list; feed (an iterator of bytes) goes to its stdin."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            _dies_with_us(argv),
            stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
        feed_error: PgOpsError | None = None
        if feed is not None:
            try:
                for chunk in feed:
                    proc.stdin.write(chunk)  # type: ignore[union-attr]
            except BrokenPipeError:
                pass  # the tool stopped on an error: its exit status and stderr tell why
            except PgOpsError as exc:
                feed_error = exc
                proc.kill()
            finally:
                try:
                    proc.stdin.close()  # type: ignore[union-attr]
                except BrokenPipeError:
                    pass
        code = proc.wait()
        err.seek(0)
        message = err.read().decode(errors="replace")
    if feed_error is not None:  # the real cause: the tool was stopped because its input failed
        raise feed_error
    if code != 0:
        raise PgOpsError(f"{os.path.basename(argv[0])} exited with {code}: {_tail(message)}")


class _ToolOutput:
    """stdout of a producing tool (pg_restore -f -) as a stream; its exit status is checked at the end."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(_dies_with_us(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.err, env=env)  # fmt: skip

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)  # type: ignore[union-attr]
        if not data and self.proc.wait() != 0:
            self.err.seek(0)
            message = self.err.read().decode(errors="replace")
            raise PgOpsError(f"{os.path.basename(self.argv[0])} exited with {self.proc.returncode}: {_tail(message)}")
        return data

    def __enter__(self) -> _ToolOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.err.close()


def tool_major(path: str) -> int:
    """Major version of a client tool, from "pg_restore (PostgreSQL) 18.6"."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"\b(\d+)(?:\.\d+)?", out.split(")")[-1])
    return int(m.group(1)) if m else 0


def conninfo_for(dbname: str) -> str:
    """-d value naming only the database: a name with "=" must never be read as a connection string."""
    return psycopg.conninfo.make_conninfo(dbname=dbname)


def check_readable(dump: DumpInfo, bindir: str | None, full: bool) -> list[str]:
    """pg_restore -l (TOC) or, with full, a complete read of the dump; plain dumps are read through."""
    if dump.is_archive:
        argv = [find_tool("pg_restore", bindir), "-f", os.devnull]
        argv += [] if full else ["-l"]
        argv.append(os.path.abspath(dump.path))
        try:
            _run_tool(argv, dict(os.environ))
        except PgOpsError as exc:
            raise PgOpsError(f"dump {dump.path!r} is not readable ({dump.format} format): {exc}") from exc
        return []
    flt = PlainFilter()
    with open_plain(dump.path, dump.format) as stream:
        gen = flt.lines(stream)
        for _line in gen if full else itertools.islice(gen, 2000):
            pass
    return flt.dropped


def restore_into(params: ConnParams, info: ServerInfo, dbname: str, dump: DumpInfo, req: RestoreRequest) -> list[str]:
    """Load the dump into dbname with pg_restore --exit-on-error or psql ON_ERROR_STOP (one transaction).

    pg_restore 17+ sends SET transaction_timeout, which servers before 17 reject: against those,
    the archive is turned into SQL (pg_restore -f -) and fed to psql without that line.
    """
    env = params.tool_env()
    old_server = info.version_num < 170000
    psql = [find_tool("psql", req.bindir), "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1",
            "--single-transaction", "-d", conninfo_for(dbname), "-f", "-"]  # fmt: skip
    flt = PlainFilter(unknown_settings=("transaction_timeout",) if old_server else ())
    if dump.is_archive:
        pg_restore = find_tool("pg_restore", req.bindir)
        if not (old_server and tool_major(pg_restore) >= 17):
            jobs = req.jobs or os.cpu_count() or 1
            argv = [pg_restore, "--exit-on-error", "--no-password", "-d", conninfo_for(dbname)]
            if dump.format != "tar" and jobs > 1:  # tar archives cannot be restored in parallel
                argv.append(f"--jobs={jobs}")
            _run_tool([*argv, *req.restore_args, os.path.abspath(dump.path)], env)
            return []
        with _ToolOutput([pg_restore, "-f", "-", *req.restore_args, os.path.abspath(dump.path)], env) as sql_out:
            _run_tool(psql, env, feed=flt.lines(sql_out))
        return flt.dropped
    with open_plain(dump.path, dump.format) as stream:
        _run_tool([*psql[:-2], *req.restore_args, "-f", "-"], env, feed=flt.lines(stream))
    return flt.dropped


def verify(params: ConnParams, dbname: str, req: RestoreRequest) -> None:
    conn = connect(params.with_db(dbname))
    with conn:
        if req.verify_query:
            try:
                row = conn.execute(req.verify_query).fetchone()
            except psycopg.Error as exc:
                raise PgOpsError(f"verify_query failed on the restored copy: {one_line(exc)}") from exc
            if not row or not row[0]:
                got = row[0] if row else "no row"
                raise PgOpsError(f"verify_query returned {got!r} on the restored copy, not true")
        if req.analyze:
            conn.execute("ANALYZE")


# --- the operations --------------------------------------------------------------------------


def restore_database(params: ConnParams, req: RestoreRequest, *, check_mode: bool = False) -> RestoreResult:
    res = RestoreResult(db=req.db, strategy="rollback" if req.rollback else req.strategy, phase=req.phase)
    clock = _Clock(res)
    conn = _Maintenance(params, req.db)
    try:
        info = server_info(conn)
        res.server_version = info.version
        if not check_mode:
            with clock.phase("lock"):
                conn.lock(req.lock_timeout)
        if req.rollback:
            _rollback(conn, info, params, req, res, clock, check_mode)
        elif req.phase == "abort":
            _abort(info, params, req, res, conn, check_mode)
        elif req.phase == "switch":
            _switch_staged(conn, info, params, req, res, clock, check_mode)
        else:
            _restore(conn, info, params, req, res, clock, check_mode)
        return res
    finally:
        clock.finish()
        conn.close()  # releases the advisory lock


def _restore(
    conn: Any, info: ServerInfo, params: ConnParams, req: RestoreRequest, res: RestoreResult, clock: _Clock,
    check_mode: bool,
) -> None:  # fmt: skip
    with clock.phase("inspect"):
        dump = detect_format(req.src)  # type: ignore[arg-type]
        res.format = dump.format
        res.sha256 = fingerprint(dump)
        live_exists = database_exists(conn, req.db)
        res.marker_before = read_marker(params, req.db) if live_exists else None
        _sizes(conn, req.db, res, live_exists)
    staging = res.staging_db = staging_name(req.db)
    stale = database_exists(conn, staging)
    new_marker = {"sha256": res.sha256, "format": dump.format, "size": dump.size,
                  "src": os.path.basename(dump.path.rstrip("/"))}  # fmt: skip
    res.diff = {"before": {"marker": res.marker_before}, "after": {"marker": new_marker}}
    if res.marker_before and res.marker_before["sha256"] == res.sha256 and not req.force:
        res.diff["after"]["marker"] = res.marker_before
        res.log.append(f'"{req.db}" already holds this dump (sha256 {res.sha256[:12]}…): nothing to do')
        if stale and not check_mode:
            drop_database(params, info, staging, req.wait_timeout)
            res.dropped.append(staging)
            res.changed = True
            res.log.append(f'dropped "{staging}" left behind by an interrupted run')
        return

    replace = req.strategy == "replace" and live_exists
    with clock.phase("preflight"):
        res.stripped_statements = check_readable(dump, req.bindir, full=replace)
    stamp = utc_stamp()
    prev = previous_name(req.db, stamp)
    if stale:
        res.plan.append(f'drop "{staging}" left behind by an interrupted run')
    if replace:
        res.plan += [f'block and clear "{req.db}"', f'drop "{req.db}"', f'create "{staging}" and restore into it',
                     f'rename "{staging}" to "{req.db}"']  # fmt: skip
    else:
        res.plan += [f'create "{staging}" and restore {dump.format} dump into it', "verify it"]
        if live_exists:
            res.plan += [
                f'block and clear "{req.db}"',
                f'rename "{req.db}" to "{prev}"',
                f'rename "{staging}" to "{req.db}"',
            ]
            old = list_previous(conn, req.db)[max(req.keep_previous - 1, 0) :] if req.keep_previous else []
            res.plan += [f'drop "{n}" (keep_previous={req.keep_previous})' for n in old]
            if req.keep_previous == 0:
                res.plan.append(f'drop "{prev}" (keep_previous=0)')
        else:
            res.plan.append(f'rename "{staging}" to "{req.db}"')
    res.changed = True
    if check_mode:
        res.log.append(f"check mode: {dump.format} dump is readable; would " + "; ".join(res.plan))
        return

    if stale:
        with clock.phase("cleanup"):
            drop_database(params, info, staging, req.wait_timeout)
        res.dropped.append(staging)
        res.log.append(f'dropped "{staging}" left behind by an interrupted run')
    live = read_settings(conn, req.db) if live_exists else None
    if req.phase == "stage":
        _stage(conn, info, params, req, res, clock, dump, live)
        res.staged = True
        res.log.append(f'"{staging}" is restored and verified; phase=switch puts it in place of "{req.db}"')
        return
    if replace:
        _switch_replace(conn, info, params, req, res, clock, dump, live)
    else:
        _stage(conn, info, params, req, res, clock, dump, live)
        if live_exists:
            try:
                _switch_swap(conn, info, params, req, res, clock, staging, prev)
            except BaseException:
                _drop_quietly(params, info, staging, req.wait_timeout)
                raise
        else:
            _rename(conn, staging, req.db)
            res.log.append(f'"{req.db}" did not exist: created it from the dump')
    res.marker_after = read_marker(params, req.db)
    res.diff["after"]["marker"] = res.marker_after
    with clock.phase("cleanup"):
        _drop_old_copies(conn, info, params, req, res)


def _sizes(conn: Any, db: str, res: RestoreResult, live_exists: bool) -> None:
    """Size of the live database and where the cluster keeps its data, for disk-space checks."""
    if live_exists:
        try:
            res.live_size_bytes = conn.execute("SELECT pg_database_size(%s)", (db,)).fetchone()[0]
        except psycopg.Error:  # needs CONNECT on it or pg_read_all_stats
            res.live_size_bytes = 0
    try:
        res.data_directory = conn.execute("SELECT current_setting('data_directory')").fetchone()[0]
    except psycopg.Error:  # superuser or pg_read_all_settings only
        res.data_directory = ""


def _abort(info: ServerInfo, params: ConnParams, req: RestoreRequest, res: RestoreResult, conn: Any,
           check_mode: bool) -> None:  # fmt: skip
    staging = res.staging_db = staging_name(req.db)
    if database_exists(conn, staging):
        res.changed = True
        res.plan = [f'drop "{staging}"']
        if not check_mode:
            drop_database(params, info, staging, req.wait_timeout)
            res.dropped.append(staging)
            res.log.append(f'dropped the staged copy "{staging}"; "{req.db}" was not touched')


def _switch_staged(
    conn: Any, info: ServerInfo, params: ConnParams, req: RestoreRequest, res: RestoreResult, clock: _Clock,
    check_mode: bool,
) -> None:  # fmt: skip
    """phase=switch: put the copy staged earlier in place (no-op when the live one already holds src)."""
    staging = res.staging_db = staging_name(req.db)
    live_exists = database_exists(conn, req.db)
    res.marker_before = read_marker(params, req.db) if live_exists else None
    if req.src:
        res.sha256 = fingerprint(detect_format(req.src))
    if not database_exists(conn, staging):
        if req.src and res.marker_before and res.marker_before["sha256"] == res.sha256:
            res.log.append(f'"{req.db}" already holds this dump: nothing to switch')
            return
        raise PgOpsError(f'nothing is staged for "{req.db}" ("{staging}" does not exist): run phase=stage first')
    staged = read_marker(params, staging)
    if staged is None or (req.src and staged["sha256"] != res.sha256):
        raise PgOpsError(f'"{staging}" does not hold a verified copy of {req.src or "a dump"}: run phase=stage again')
    prev = previous_name(req.db, utc_stamp())
    res.plan = [f'block and clear "{req.db}"', f'rename "{req.db}" to "{prev}"'] if live_exists else []
    res.plan.append(f'rename "{staging}" to "{req.db}"')
    res.changed = True
    res.diff = {"before": {"marker": res.marker_before}, "after": {"marker": staged}}
    if check_mode:
        return
    if live_exists:
        _switch_swap(conn, info, params, req, res, clock, staging, prev)
    else:
        _rename(conn, staging, req.db)
    res.marker_after = read_marker(params, req.db)
    with clock.phase("cleanup"):
        _drop_old_copies(conn, info, params, req, res)


def _stage(
    conn: Any, info: ServerInfo, params: ConnParams, req: RestoreRequest, res: RestoreResult, clock: _Clock,
    dump: DumpInfo, live: DatabaseSettings | None,
) -> None:  # fmt: skip
    """Create the staging copy, restore, verify, mark and give it the live settings; drop it on any failure."""
    staging = res.staging_db
    create_database(conn, staging, req, live)
    try:
        with clock.phase("stage"):
            res.stripped_statements = restore_into(params, info, staging, dump, req)
        res.log.append(f'restored the {dump.format} dump into "{staging}" in {res.phases_ms["stage"]} ms')
        with clock.phase("verify"):
            verify(params, staging, req)
            with connect(params.with_db(staging)) as staged:
                write_marker(staged, dump, res.sha256)
            if live is not None:
                res.log += [f"carried over: {stmt}" for stmt in apply_settings(conn, staging, live, req.owner)]
    except BaseException as exc:
        _drop_quietly(params, info, staging, req.wait_timeout)
        if isinstance(exc, PgOpsError):
            where = f'"{req.db}" was not touched' if live is not None else f'"{req.db}" was not created'
            raise PgOpsError(f"restore of {dump.path!r} failed, {where} and the staging copy was removed: {exc}",
                             **exc.details) from exc  # fmt: skip
        raise


def _drop_quietly(params: ConnParams, info: ServerInfo, name: str, wait_timeout: float) -> None:
    try:
        drop_database(params, info, name, wait_timeout)
    except PgOpsError:
        pass  # reported by the next run, which drops the leftover first


def _switch_swap(
    conn: Any, info: ServerInfo, params: ConnParams, req: RestoreRequest, res: RestoreResult, clock: _Clock,
    staging: str, prev: str,
) -> None:  # fmt: skip
    """The only window the app sees: block + clear live, then both renames in one transaction."""
    block = _default_block(info, req.block)

    def switch(c: Any) -> None:
        def renames() -> None:
            _rename(c, req.db, prev)
            _rename(c, staging, req.db)

        _in_transaction_retrying(c, info, req.db, renames)

    with clock.phase("switch"):
        cleared = clear_sessions(params, _clear_request(req, req.db, block), on_cleared=switch)
    _record_switch(res, cleared, conn)
    res.previous_db = prev
    res.rollback = {"db": req.db, "rollback": True}
    res.rollback_sql = _swap_sql(conn, req.db, prev, undone_name(req.db, "<UTC time>"))
    res.log.append(
        f'switched: "{req.db}" is the restored copy, the old one is "{prev}"; '
        f"app-visible window {res.switch_window_ms} ms, {res.terminated} session(s) ended"
    )


def _in_transaction_retrying(conn: Any, info: ServerInfo, db: str, body: Any, attempts: int = 5) -> None:
    """Run the renames in one transaction; a backend that slipped in before the block is ended and we retry."""
    for attempt in range(attempts):
        try:
            with conn.transaction():
                body()
            return
        except PgOpsError as exc:
            if "being accessed by other users" not in str(exc) or attempt == attempts - 1:
                raise
            late = [s.pid for s in list_sessions(conn, info, db)]
            if late:
                terminate_backends(conn, late, cancel_first=False)
            time.sleep(0.05)


def _clear_request(req: RestoreRequest, db: str, block: str) -> ClearRequest:
    return ClearRequest(db=db, state="blocked", block=block, block_roles=req.block_roles,
                        wait_timeout=req.wait_timeout, fallback=req.fallback, restart=req.restart)  # fmt: skip


def _record_switch(res: RestoreResult, cleared: ClearResult, conn: _Maintenance) -> None:
    if cleared.restarted:
        conn.invalidate()
    res.terminated += cleared.count
    res.terminated_sessions += cleared.terminated
    res.restarted = res.restarted or cleared.restarted
    res.switch_window_ms = sum(v for k, v in cleared.elapsed_ms.items() if k not in ("connect", "total"))
    res.log += [f"switch: {line}" for line in cleared.log]


def _swap_sql(conn: Any, db: str, prev: str, undone: str) -> list[str]:
    stmts = [
        sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(ident(db)),
        sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = {}").format(sql.Literal(db)),
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(db), ident(undone)),
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(prev), ident(db)),
        sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(ident(db)),
    ]
    return [s.as_string(conn) + ";" for s in stmts]


def _switch_replace(
    conn: Any, info: ServerInfo, params: ConnParams, req: RestoreRequest, res: RestoreResult, clock: _Clock,
    dump: DumpInfo, live: DatabaseSettings | None,
) -> None:  # fmt: skip
    """replace: the live database is dropped before the restore; the outage lasts the whole restore."""
    block = _default_block(info, req.block)

    def drop(c: Any) -> None:
        _execute(c, sql.SQL("DROP DATABASE {}").format(ident(req.db)), f'cannot drop "{req.db}"')

    t = time.monotonic()
    with clock.phase("switch"):
        cleared = clear_sessions(params, _clear_request(req, req.db, block), on_cleared=drop)
    _record_switch(res, cleared, conn)
    res.log.append(f'dropped "{req.db}" (strategy=replace) after ending {cleared.count} session(s)')
    try:
        _stage(conn, info, params, req, res, clock, dump, live)
    except PgOpsError as exc:
        raise PgOpsError(
            f'strategy=replace: "{req.db}" was dropped before the restore, which then failed; restore it again '
            f"from a good dump. Cause: {exc}"
        ) from exc
    _rename(conn, res.staging_db, req.db)
    res.switch_window_ms = int((time.monotonic() - t) * 1000)
    res.log.append(f'"{req.db}" restored in place; outage {res.switch_window_ms} ms (the whole restore)')


def _drop_old_copies(conn: Any, info: ServerInfo, params: ConnParams, req: RestoreRequest, res: RestoreResult) -> None:
    for name in list_previous(conn, req.db)[req.keep_previous :]:
        drop_database(params, info, name, req.wait_timeout)
        res.dropped.append(name)
        res.log.append(f'dropped old copy "{name}" (keep_previous={req.keep_previous})')
    if res.previous_db and res.previous_db in res.dropped:
        res.previous_db = ""
        res.rollback, res.rollback_sql = {}, []


def _rollback(
    conn: Any, info: ServerInfo, params: ConnParams, req: RestoreRequest, res: RestoreResult, clock: _Clock,
    check_mode: bool,
) -> None:  # fmt: skip
    """Swap the newest previous copy back; the replaced database is kept as <db>_undone_<time>."""
    prevs = list_previous(conn, req.db)
    if not prevs:
        raise PgOpsError(
            f'no previous copy of "{req.db}" to roll back to (looked for databases named '
            f'"{name_base(req.db)}_prev_<UTC time>"); nothing was changed'
        )
    prev = prevs[0]
    live_exists = database_exists(conn, req.db)
    undone = undone_name(req.db, utc_stamp())
    res.previous_db = prev
    res.marker_before = read_marker(params, req.db) if live_exists else None
    res.plan = [f'block and clear "{req.db}"', f'rename "{req.db}" to "{undone}"'] if live_exists else []
    res.plan.append(f'rename "{prev}" to "{req.db}" and reopen it')
    res.changed = True
    if check_mode:
        res.log.append("check mode: would " + "; ".join(res.plan))
        return
    block = _default_block(info, req.block)

    def switch(c: Any) -> None:
        def renames() -> None:
            if live_exists:
                _rename(c, req.db, undone)
            _rename(c, prev, req.db)

        _in_transaction_retrying(c, info, req.db, renames)

    with clock.phase("switch"):
        if live_exists:
            cleared = clear_sessions(params, _clear_request(req, req.db, block), on_cleared=switch)
            _record_switch(res, cleared, conn)
        else:
            switch(conn)
        # previous copies were closed when they were switched out
        set_blocked(conn, info, req.db, block, req.block_roles, blocked=False)
    res.marker_after = read_marker(params, req.db)
    res.diff = {"before": {"marker": res.marker_before}, "after": {"marker": res.marker_after}}
    res.log.append(
        f'rolled back: "{req.db}" is again the copy from before the restore ("{prev}"); the replaced one is kept '
        f'as "{undone}" (drop it when sure: DROP DATABASE {ident(undone).as_string(conn)};)'
    )
