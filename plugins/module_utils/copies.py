# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The copies of a database a restore makes: their names, the settings they carry over, creating and dropping."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import best_method, grant_sql, read_acl
from ansible_collections.pgops.dbrestore.plugins.module_utils.logical import drop_subscriptions
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    OBJECT_IN_USE,
    ConnParams,
    PgOpsError,
    ServerInfo,
    connect,
    execute,
    ident,
    sql,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import ClearRequest, clear_sessions

NAMEDATALEN = 64  # PostgreSQL names are at most 63 bytes
MAX_BASE_BYTES = 36  # room for "_prev_" + a timestamp within PostgreSQL's 63-byte names


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


def free_name(conn: Any, name: str) -> str:
    """name, or name with a counter when a database of that name exists (a clock that stepped back)."""
    taken = {r[0] for r in conn.execute("SELECT datname FROM pg_catalog.pg_database").fetchall()}
    candidate, n = name, 1
    while candidate in taken:
        suffix = f"_{n}"
        head = name.encode()[: NAMEDATALEN - 1 - len(suffix)].decode("utf-8", errors="ignore")
        candidate, n = head + suffix, n + 1
    return candidate


@dataclass
class DatabaseSettings:
    """Database-level settings that belong to the database, not to its contents."""

    owner: str
    encoding: str
    collate: str
    ctype: str
    acl: list[tuple[str | None, str, bool]]  # (grantee, None for PUBLIC; privilege; grantable), in ACL order
    has_acl: bool
    conn_limit: int
    comment: str | None
    role_settings: list[tuple[str | None, str]]  # (role or None for the database, "name=value")


def read_settings(conn: Any, db: str) -> DatabaseSettings:
    row = conn.execute(
        "SELECT pg_catalog.pg_get_userbyid(d.datdba), pg_catalog.pg_encoding_to_char(d.encoding), d.datcollate, "
        "d.datctype, d.datacl IS NOT NULL, d.datconnlimit, pg_catalog.shobj_description(d.oid, 'pg_database'), d.oid "
        "FROM pg_catalog.pg_database d WHERE d.datname = %s",
        (db,),
    ).fetchone()
    if row is None:
        raise PgOpsError(f'database "{db}" does not exist')
    role_settings = conn.execute(
        "SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(s.setrole) END, c "
        "FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) c WHERE s.setdatabase = %s",
        (row[7],),
    ).fetchall()
    return DatabaseSettings(
        owner=row[0], encoding=row[1], collate=row[2], ctype=row[3], acl=list(read_acl(conn, db, defaults=False)),
        has_acl=row[4], conn_limit=row[5], comment=row[6], role_settings=[tuple(r) for r in role_settings],
    )  # fmt: skip


# GUCs whose stored value is a list of (possibly double-quoted) elements
_LIST_GUCS = {"search_path", "temp_tablespaces", "session_preload_libraries", "local_preload_libraries"}


def _setting_values(name: str, value: str) -> list[str]:
    if name not in _LIST_GUCS:
        return [value]
    return [m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2).strip()
            for m in re.finditer(r'\s*(?:"((?:[^"]|"")*)"|([^,]+))\s*(?:,|$)', value)]  # fmt: skip


def apply_settings(conn: Any, db: str, s: DatabaseSettings, owner: str | None) -> list[str]:
    """Give db the live database's owner, GRANTs, connection limit, comment and ALTER DATABASE SET values.

    Returns the statements for the log, with setting values masked (they may hold secrets).
    """
    target = ident(db)
    stmts = [(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(target, ident(owner or s.owner)), None)]
    if s.has_acl:  # emptied first, then granted in the live order, so the ACL comes out the same
        new_owner = ident(owner or s.owner)
        stmts.append((sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC, {}").format(target, new_owner), None))
        stmts += [(grant, None) for grant in grant_sql(db, s.acl)]
    if s.conn_limit != -1:
        stmts.append((sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(target, sql.Literal(s.conn_limit)), None))
    if s.comment is not None:
        stmts.append((sql.SQL("COMMENT ON DATABASE {} IS {}").format(target, sql.Literal(s.comment)), None))
    for role, item in s.role_settings:
        name, _sep, value = item.partition("=")
        guc = sql.Identifier(*name.split("."))
        values = sql.SQL(", ").join(sql.Literal(v) for v in _setting_values(name, value))
        if role is None:
            head = sql.SQL("ALTER DATABASE {} SET {} = ").format(target, guc)
        else:
            head = sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} = ").format(ident(role), target, guc)
        stmts.append((head + values, head + sql.SQL("<masked>")))
    for stmt, _shown in stmts:
        execute(conn, stmt, f'cannot carry database settings over to "{db}"')
    return [(shown or stmt).as_string(conn) for stmt, shown in stmts]


def create_database(conn: Any, name: str, template: str, owner: str | None, locale: dict[str, str | None]) -> int:
    """CREATE DATABASE name; locale maps ENCODING, LC_COLLATE, LC_CTYPE to values (None: the template's).

    Returns the new database's OID, by which our records know it.
    """
    parts = [sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(ident(name), ident(template))]
    for key, value in locale.items():
        if value:
            parts.append(sql.SQL(f"{key} {{}}").format(sql.Literal(value)))
    if owner:
        parts.append(sql.SQL("OWNER {}").format(ident(owner)))
    execute(conn, sql.SQL(" ").join(parts), f'cannot create database "{name}"')
    return int(conn.execute("SELECT oid FROM pg_catalog.pg_database WHERE datname = %s", (name,)).fetchone()[0])


def drop_statement(name: str) -> sql.Composed:
    return sql.SQL("DROP DATABASE {}").format(ident(name))


def drop_database(params: ConnParams, info: ServerInfo, name: str, wait_timeout: float) -> None:
    """Close, clear and drop a database of our own (staging, previous copy, partial restore).

    It is dropped as soon as no session is seen (no settle time): a session that slipped in makes DROP DATABASE
    fail with OBJECT_IN_USE and change nothing, and the sessions are then cleared again, until wait_timeout.
    """

    def run_drop(conn: Any, _closure: object) -> None:
        execute(conn, drop_statement(name), f'cannot drop "{name}"')

    close_database(params, info, name, wait_timeout, then=run_drop)


def close_database(params: ConnParams, info: ServerInfo, name: str, wait_timeout: float,
                   then: Callable[[Any, object], None] | None = None) -> None:  # fmt: skip
    """Drop its subscriptions, close it to everyone and end its sessions; `then` runs while it is clear.

    Without `then` it is left closed and cleared, for a drop in a session of its own (pruner.py).
    """
    if info.version_num >= 100000:  # a database with subscriptions cannot be dropped
        with connect(params) as conn:
            drop_subscriptions(params, conn, name, wait_timeout)
    method = best_method(info, "allow_connections").name
    request = ClearRequest(db=name, state="blocked", block=method, wait_timeout=wait_timeout, record_block=False,
                           settle_seconds=0.0)  # fmt: skip
    deadline = time.monotonic() + wait_timeout
    while True:
        try:
            clear_sessions(params, request, on_cleared=then)
            return
        except PgOpsError as exc:
            if exc.sqlstate != OBJECT_IN_USE or time.monotonic() >= deadline:
                raise
