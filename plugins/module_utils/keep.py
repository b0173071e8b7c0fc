# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""keep_tables: tables whose live rows are carried into the restored copy inside the switch window.

For tables the restored data must not replace, such as the login sessions of an ActiveRecord
session store (`sessions`): whoever is signed in stays signed in after the restore. The switch
closes and clears the live database, copies these tables' rows from it into the staging copy
(replacing the dump's rows), sets their sequences to the live values, and only then renames.

Safety: the copy runs as the login role (a superuser) on the app's tables, so it must run none of
the app's own code. Writing with session_replication_role=replica keeps the tables' ordinary
user triggers (and the foreign-key triggers) from firing; tables with triggers that fire even
then (ENABLE ALWAYS / ENABLE REPLICA), or whose constraints, index expressions or generated
columns call functions outside pg_catalog, are refused before anything is staged. A table whose
columns differ between the live database and the dump is refused too (its rows would not fit).
"""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    ConnParams,
    PgOpsError,
    psycopg,
    sql,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.tools import find_tool

FEATURE_NOT_SUPPORTED = "0A000"
INSUFFICIENT_PRIVILEGE = "42501"
UNDEFINED_TABLE = "42P01"
DATATYPE_MISMATCH = "42804"


@dataclass(frozen=True)
class KeepTable:
    schema: str
    name: str

    @classmethod
    def parse(cls, text: str) -> KeepTable:
        """sessions (in public) or app.sessions; no quoting, so no name can mean two tables."""
        parts = text.split(".")
        if len(parts) > 2 or not all(parts):
            raise PgOpsError(f"keep_tables: {text!r} is not a table name (table or schema.table)")
        return cls(*parts) if len(parts) == 2 else cls("public", parts[0])

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> Any:
        return sql.Identifier(self.schema, self.name)


def parse_tables(names: tuple[str, ...] | list[str]) -> list[KeepTable]:
    tables = [KeepTable.parse(n) for n in names]
    if len(set(tables)) != len(tables):
        raise PgOpsError(f"keep_tables names a table twice: {list(names)}")
    return tables


# --- structure ---------------------------------------------------------------------------------


def columns(conn: Any, table: KeepTable) -> list[tuple[str, str, str]] | None:
    """(name, quoted name, type as pg_dump writes it) of the table's columns in order; None when it does not exist."""
    oid = _oid(conn, table)
    if oid is None:
        return None
    rows = conn.execute(
        "SELECT attname, pg_catalog.quote_ident(attname), pg_catalog.format_type(atttypid, atttypmod) "
        "FROM pg_catalog.pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (oid,),
    ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def _oid(conn: Any, table: KeepTable) -> int | None:
    row = conn.execute(
        "SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (table.schema, table.name),
    ).fetchone()
    return int(row[0]) if row else None


def _quote(name: str) -> str:
    return name if re.match(r"^[a-z_][a-z0-9_$]*$", name) else '"' + name.replace('"', '""') + '"'


def dump_columns(schema_sql: str, table: KeepTable) -> list[str] | None:
    """The column lines of the table's CREATE TABLE in pg_dump's SQL (None when the dump has no such table)."""
    head = f"CREATE TABLE {_quote(table.schema)}.{_quote(table.name)} ("
    lines = schema_sql.splitlines()
    for i, line in enumerate(lines):
        if line.rstrip() == head:
            body = []
            for col in lines[i + 1 :]:
                if col.startswith(")"):
                    return body
                body.append(col.strip().rstrip(","))
            return body
    return None


def schema_sql(dump: Any, bindir: str | None, tables: list[KeepTable]) -> str:
    """The dump's CREATE TABLE text: pg_restore --schema-only of an archive; a plain dump read as far as needed."""
    if dump.is_archive:
        out = subprocess.run(
            [find_tool("pg_restore", bindir), "--schema-only", "-f", "-", dump.child_path],
            pass_fds=(dump.fd,), stdin=subprocess.DEVNULL, capture_output=True, check=False,
        )  # fmt: skip
        return out.stdout.decode(errors="replace")
    heads = {f"CREATE TABLE {_quote(t.schema)}.{_quote(t.name)} (".encode() for t in tables}
    found: list[bytes] = []
    with dump.plain_stream() as stream:
        rest, taking = b"", False
        while heads or taking:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if taking:
                    found.append(line)
                    taking = not line.startswith(b")")
                elif line.rstrip() in heads:
                    heads.discard(line.rstrip())
                    found.append(line)
                    taking = True
    return b"\n".join(found).decode(errors="replace")


def differences(live: list[tuple[str, str, str]], in_dump: list[str], other: str = "dump") -> list[str]:
    """What differs between the live columns and the dump's CREATE TABLE lines (empty: the same).

    other names the dump's side in the messages ("source" for a source database's columns).
    """
    problems = []
    for i in range(max(len(live), len(in_dump))):
        want = f"{live[i][1]} {live[i][2]}" if i < len(live) else None
        got = in_dump[i] if i < len(in_dump) else None
        if want is None:
            problems.append(f"the {other} has a column more ({got})")
        elif got is None:
            problems.append(f"the {other} lacks column {live[i][1]} ({live[i][2]})")
        elif got != want and not got.startswith(want + " "):
            problems.append(f"column {i + 1}: live {want!r}, {other} {got!r}")
    return problems


def unsafe_code(conn: Any, table: KeepTable) -> list[str]:
    """App code that writing the table's rows would run as us: triggers firing even as replica, functions."""
    oid = _oid(conn, table)
    if oid is None:
        return []
    triggers = conn.execute(
        "SELECT tgname FROM pg_catalog.pg_trigger WHERE tgrelid = %s AND NOT tgisinternal AND tgenabled IN ('A', 'R') "
        "ORDER BY 1",
        (oid,),
    ).fetchall()
    functions = conn.execute(
        "SELECT DISTINCT p.oid::pg_catalog.regprocedure::text FROM pg_catalog.pg_depend d "
        "JOIN pg_catalog.pg_proc p ON d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.refobjid = p.oid "
        "WHERE p.pronamespace <> 'pg_catalog'::pg_catalog.regnamespace AND ("
        " (d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass"
        "  AND d.objid IN (SELECT oid FROM pg_catalog.pg_constraint WHERE conrelid = %s))"
        " OR (d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass"
        "  AND d.objid IN (SELECT indexrelid FROM pg_catalog.pg_index WHERE indrelid = %s))"
        " OR (d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass"
        "  AND d.objid IN (SELECT oid FROM pg_catalog.pg_attrdef WHERE adrelid = %s))"
        ") ORDER BY 1",
        (oid, oid, oid),
    ).fetchall()
    return [f"trigger {r[0]} fires even with session_replication_role=replica" for r in triggers] + [
        f"its constraints, indexes or column expressions call {r[0]}" for r in functions
    ]


def preflight_problems(conn: Any, info: Any, tables: list[KeepTable], live_exists: bool, dump_sql: str) -> list[str]:
    """Why keep_tables cannot work for this restore of a dump (empty: it can), found before anything is staged."""
    return _problems(conn, info, tables, live_exists, "dump", lambda table: dump_columns(dump_sql, table))


def source_preflight_problems(
    conn: Any, info: Any, tables: list[KeepTable], live_exists: bool, source: Any
) -> list[str]:
    """The same for a source database streamed in (source): the live tables against the source's catalogs.

    source is a connection into the source database; the staged copy gets its tables as they are there.
    """

    def source_columns(table: KeepTable) -> list[str] | None:
        found = columns(source, table)
        return None if found is None else [f"{quoted} {kind}" for _name, quoted, kind in found]

    problems = _problems(conn, info, tables, live_exists, "source database", source_columns)
    for table in tables:
        problems += [f"keep_tables: {table} in the source database: {p}" for p in unsafe_code(source, table)]
    return problems


def _problems(
    conn: Any, info: Any, tables: list[KeepTable], live_exists: bool, other: str,
    other_columns: Callable[[KeepTable], list[str] | None],
) -> list[str]:  # fmt: skip
    if not tables:
        return []
    problems = []
    if not info.is_superuser:
        problems.append(
            f'keep_tables needs a superuser login (role "{info.current_user}" is not): the rows are written with '
            "session_replication_role=replica, so that none of the app's triggers run"
        )
    if not live_exists:
        return problems
    for table in tables:
        live = columns(conn, table)
        if live is None:
            problems.append(f"keep_tables: the live database has no table {table}")
            continue
        theirs = other_columns(table)
        if theirs is None:
            problems.append(f"keep_tables: the {other} has no table {table}")
            continue
        diff = differences(live, theirs, other.split()[0])
        if diff:
            between = f"between the live database and the {other}"
            problems.append(f"keep_tables: {table} differs {between}: {'; '.join(diff)}")
        problems += [f"keep_tables: {table}: {p}" for p in unsafe_code(conn, table)]
    return problems


def staging_problems(live: Any, staging: Any, tables: list[KeepTable]) -> list[str]:
    """The restored copy's tables against the live ones, from the catalogs (after the load, before the switch)."""
    problems = []
    for table in tables:
        a, b = columns(live, table), columns(staging, table)
        if a != b:
            problems.append(f"keep_tables: {table} differs between the live database {a} and the restored copy {b}")
        problems += [f"keep_tables: {table} in the restored copy: {p}" for p in unsafe_code(staging, table)]
    return problems


# --- the copy, inside the switch window ------------------------------------------------------------


@dataclass
class Carried:
    rows: dict[str, int] = field(default_factory=dict)
    ms: int = 0


class Carrier:
    """Connections into the live database and the staging copy, opened before the window.

    The live one carries an application_name no one else can know, which the clear leaves alone;
    it is closed before the renames (a database with sessions cannot be renamed).
    """

    def __init__(self, params: ConnParams, db: str, staging: str, tables: list[KeepTable]) -> None:
        self.tables = tables
        self.app_name = f"pgops.dbrestore.keep.{secrets.token_hex(8)}"
        self.live = _connect(params.with_db(db), self.app_name)
        try:
            self.staging = _connect(params.with_db(staging), "pgops.dbrestore")
        except BaseException:
            self.live.close()
            raise

    def check(self) -> None:
        problems = staging_problems(self.live, self.staging, self.tables)
        if problems:
            raise PgOpsError("; ".join(problems), sqlstate=DATATYPE_MISMATCH)

    def carry(self) -> Carried:
        """Replace the staging copy's rows of each table with the live ones, in one transaction."""
        done, t = Carried(), time.monotonic()
        with self.live.transaction(), self.staging.transaction():
            self.live.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            # no user trigger and no foreign-key trigger fires: no app code runs as us, and
            # rows referencing others (sessions -> users) need not exist in the dump's data
            self.staging.execute("SET LOCAL session_replication_role = replica")
            for table in self.tables:
                generated = _generated(self.staging, table)  # COPY FROM computes those itself
                cols = [sql.Identifier(c[0]) for c in columns(self.live, table) or [] if c[0] not in generated]
                col_list = sql.SQL(", ").join(cols)
                self.staging.execute(sql.SQL("DELETE FROM {}").format(table.ident))
                out = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT binary)").format(col_list, table.ident)
                into = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(table.ident, col_list)
                writer = self.staging.cursor()
                with self.live.cursor().copy(out) as src, writer.copy(into) as dst:
                    for block in src:
                        dst.write(block)
                done.rows[str(table)] = writer.rowcount
                _carry_sequences(self.live, self.staging, table)
        done.ms = int((time.monotonic() - t) * 1000)
        return done

    def close(self) -> None:
        for conn in (self.live, self.staging):
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass


def _connect(params: ConnParams, app_name: str) -> Any:
    try:
        return psycopg.connect(autocommit=True, **{**params.libpq_kwargs(), "application_name": app_name})
    except psycopg.OperationalError as exc:
        raise PgOpsError(f"keep_tables: cannot connect to {params.login_db}: {exc}") from exc


def _generated(conn: Any, table: KeepTable) -> set[str]:
    """Names of stored generated columns (12+)."""
    if conn.info.server_version < 120000:
        return set()
    rows = conn.execute(
        "SELECT attname FROM pg_catalog.pg_attribute "
        "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped AND attgenerated <> ''",
        (_oid(conn, table),),
    ).fetchall()
    return {r[0] for r in rows}


def _carry_sequences(live: Any, staging: Any, table: KeepTable) -> None:
    """The table's own sequences (serial, identity) continue where the live ones are, or new rows collide."""
    rows = live.execute(
        "SELECT s.relname, n.nspname FROM pg_catalog.pg_depend d "
        "JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
        "JOIN pg_catalog.pg_namespace n ON n.oid = s.relnamespace "
        "WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid = %s AND d.deptype IN ('a', 'i')",
        (_oid(live, table),),
    ).fetchall()
    for name, schema in rows:
        seq = sql.Identifier(schema, name)
        last, called = live.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(seq)).fetchone()
        staging.execute("SELECT pg_catalog.setval(%s::pg_catalog.regclass, %s, %s)",
                        (seq.as_string(staging), last, called))  # fmt: skip


def not_supported(strategy: str) -> PgOpsError:
    return PgOpsError(
        f"keep_tables works with strategy=swap only (not {strategy}): the rows are carried while the live "
        "database is closed, just before the staged copy takes its place",
        sqlstate=FEATURE_NOT_SUPPORTED,
    )
