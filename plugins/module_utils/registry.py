# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Our own records, where the application's role cannot write, and the per-database lock.

The records live in the schema pgops_dbrestore of the maintenance database (login_db), owned by
the login role and closed to PUBLIC. They are keyed by database OID, never by name or clock: a
database someone else created under a name we use is not ours, and a record is trusted only
while its schema and tables belong to the login role or a superuser.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import BlockState
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    LOCK_NOT_AVAILABLE,
    PgOpsError,
    execute,
    ident,
    sql,
)

SCHEMA = "pgops_dbrestore"
# first key of the advisory lock, "pgop"; the second is hashtext(<db>)
LOCK_CLASS = 0x70676F70
# the same for the key a run's background drop of old copies holds (pruner.py), "pgoq"
PRUNE_CLASS = 0x70676F71
PRUNE_WAIT_S = 600  # dropping a copy of a few TB takes minutes; longer means it waits on something else

_TABLES = {
    "restored": "datoid oid PRIMARY KEY, datname text NOT NULL, sha256 text NOT NULL, format text NOT NULL, "
    "size bigint NOT NULL, src text NOT NULL, writes bigint, restored_at timestamptz NOT NULL DEFAULT now(), "
    "restored_by name NOT NULL DEFAULT current_user, identity text, sanitize text",
    "copies": "datoid oid PRIMARY KEY, datname text NOT NULL, of_db text NOT NULL, kind text NOT NULL, "
    "block_state text NOT NULL, made_at timestamptz NOT NULL DEFAULT now()",
    "blocks": "datoid oid PRIMARY KEY, datname text NOT NULL, block_state text NOT NULL",
}
# columns added after the first release, by ensure() to the tables an older version made: (table, column, type)
_ADDED = (("restored", "identity", "text"), ("restored", "sanitize", "text"))


@dataclass(frozen=True)
class Copy:
    """A copy this collection made of a database: the previous live one, or one a rollback replaced."""

    oid: int
    name: str  # its name now
    kind: str
    block_state: BlockState
    made_at: str


def _table(name: str) -> Any:
    return sql.SQL("{}.{}").format(ident(SCHEMA), ident(name))


class Registry:
    """Reads and writes our records on the maintenance connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.warnings: list[str] = []
        self.exists, self.trusted = self._inspect()

    def _inspect(self) -> tuple[bool, bool]:
        owners = self.conn.execute(
            "SELECT pg_catalog.pg_get_userbyid(o.owner), r.rolsuper OR r.rolname = current_user FROM ("
            " SELECT n.nspowner AS owner FROM pg_catalog.pg_namespace n WHERE n.nspname = %s"
            " UNION ALL SELECT c.relowner FROM pg_catalog.pg_class c"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s) o"
            " JOIN pg_catalog.pg_roles r ON r.oid = o.owner",
            (SCHEMA, SCHEMA),
        ).fetchall()
        untrusted = sorted({name for name, ok in owners if not ok})
        if untrusted:
            self.warnings.append(
                f'ignored the records in schema "{SCHEMA}" of the maintenance database: objects there belong to '
                f"{', '.join(untrusted)}, neither the login role nor a superuser (drop the schema if it is not yours)"
            )
        self.accessible = not owners or bool(
            self.conn.execute(
                "SELECT pg_catalog.has_schema_privilege(%s, 'USAGE') AND coalesce(pg_catalog.bool_and("
                "pg_catalog.has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE')), true) "
                "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relkind = 'r'",
                (SCHEMA, SCHEMA),
            ).fetchone()[0]
        )
        if not self.accessible:
            self.warnings.append(
                f'the login role may not use the records in schema "{SCHEMA}", which a superuser made: let it run '
                f"ALTER SCHEMA {SCHEMA} OWNER TO <login role> and the same for its tables, or log in as a superuser"
            )
        self.columns = set(
            self.conn.execute(
                "SELECT c.relname, a.attname FROM pg_catalog.pg_attribute a "
                "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND a.attnum > 0 AND NOT a.attisdropped",
                (SCHEMA,),
            ).fetchall()
        )  # (table, column) rows
        return bool(owners), not untrusted

    def _usable(self) -> bool:
        return self.exists and self.trusted and self.accessible

    def ensure(self) -> None:
        """Create the schema and tables (owner: the login role, nothing for PUBLIC)."""
        if not (self.trusted and self.accessible):
            raise PgOpsError(self.warnings[-1] + "; refusing to write records there")
        execute(self.conn, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident(SCHEMA)), "cannot create records")
        execute(self.conn, sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(ident(SCHEMA)), "records")
        for name, columns in _TABLES.items():
            execute(self.conn, sql.SQL("CREATE TABLE IF NOT EXISTS {} (" + columns + ")").format(_table(name)),
                    "cannot create records")  # fmt: skip
        if not self.columns:  # just made: every column is there
            self.columns = {(t, c) for t, c, _type in _ADDED}
        for table, column, kind in _ADDED:
            if (table, column) not in self.columns:  # a table of an older version: add the column, keep the rows
                execute(self.conn, sql.SQL("ALTER TABLE {} ADD COLUMN {} " + kind).format(_table(table), ident(column)),
                        f"cannot add column {column} to our records (ALTER TABLE {SCHEMA}.{table})")  # fmt: skip
                self.columns.add((table, column))
        self.exists = True

    # --- restore markers -------------------------------------------------------------------

    def marker(self, oid: int | None) -> dict[str, Any] | None:
        """The dump the database with this OID was restored from by us, or None."""
        if oid is None or not self._usable():
            return None
        added = [c for _t, c, _k in _ADDED]  # NULL from a table an older version made, until our next write
        later = sql.SQL(", ").join(
            sql.SQL(f"m.{c}" if ("restored", c) in self.columns else "NULL::text") for c in added
        )
        row = self.conn.execute(
            sql.SQL(
                "SELECT m.sha256, m.format, m.size, m.src, pg_catalog.to_char(m.restored_at AT TIME ZONE 'UTC', "
                '\'YYYY-MM-DD"T"HH24:MI:SS"Z"\'), m.writes, {} FROM {} m WHERE m.datoid = %s'
            ).format(later, _table("restored")),
            (oid,),
        ).fetchone()
        if row is None:
            return None
        marker = dict(zip(("sha256", "format", "size", "src", "restored_at", "writes", *added), row))
        if not marker["sanitize"]:  # no sanitize scripts ran
            del marker["sanitize"]
        return marker

    def write_marker(self, oid: int, datname: str, marker: dict[str, Any]) -> None:
        self.ensure()
        execute(self.conn, sql.SQL("DELETE FROM {} WHERE datoid = %s").format(_table("restored")), "records", (oid,))
        execute(
            self.conn,
            sql.SQL("INSERT INTO {} (datoid, datname, sha256, format, size, src, writes, identity, sanitize) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)").format(_table("restored")),
            "cannot record the restore",
            (oid, datname, marker["sha256"], marker["format"], marker["size"], marker["src"], marker.get("writes"),
             marker.get("identity"), marker.get("sanitize")),
        )  # fmt: skip

    def set_identity(self, oid: int, identity: str) -> None:
        """The dump was found equal by its hash under a new identity (copied, touched): the next run reads nothing."""
        self.ensure()
        execute(self.conn, sql.SQL("UPDATE {} SET identity = %s WHERE datoid = %s").format(_table("restored")),
                "cannot update the record of the restore", (identity, oid))  # fmt: skip

    # --- copies we made --------------------------------------------------------------------

    def copies(self, of_db: str, kind: str) -> list[Copy]:
        """Our copies of of_db that still exist, newest first; records of dropped databases are ignored."""
        if not self._usable():
            return []
        rows = self.conn.execute(
            sql.SQL(
                "SELECT c.datoid, d.datname, c.kind, c.block_state, pg_catalog.to_char(c.made_at AT TIME ZONE 'UTC', "
                '\'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"\') FROM {} c JOIN pg_catalog.pg_database d ON d.oid = c.datoid '
                "WHERE c.of_db = %s AND c.kind = %s ORDER BY c.made_at DESC, c.datoid DESC"
            ).format(_table("copies")),
            (of_db, kind),
        ).fetchall()
        return [Copy(int(r[0]), r[1], r[2], BlockState.from_json(r[3]), r[4]) for r in rows]

    def add_copy(self, oid: int, datname: str, of_db: str, kind: str, state: BlockState) -> None:
        self.ensure()
        execute(
            self.conn,
            sql.SQL("INSERT INTO {} (datoid, datname, of_db, kind, block_state) VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (datoid) DO UPDATE SET datname = EXCLUDED.datname, of_db = EXCLUDED.of_db, "
                    "kind = EXCLUDED.kind, block_state = EXCLUDED.block_state, made_at = now()"
                    ).format(_table("copies")),
            "cannot record the copy",
            (oid, datname, of_db, kind, state.to_json()),
        )  # fmt: skip

    def forget_copy(self, oid: int) -> None:
        """The database is no longer a copy (it became the live one); its restore record stays."""
        if self._usable():
            execute(self.conn, sql.SQL("DELETE FROM {} WHERE datoid = %s").format(_table("copies")), "records", (oid,))

    def forget(self, oid: int) -> None:
        """Drop every record of a database (it was dropped, or became the live one again)."""
        for statement in self.forget_statements(oid):
            execute(self.conn, statement, "records")

    def forget_statements(self, oid: int) -> list[sql.Composed]:
        """What forget(oid) runs, for a session of its own (pruner.py)."""
        if not self._usable():
            return []
        return [sql.SQL("DELETE FROM {} WHERE datoid = {}").format(_table(name), sql.Literal(oid)) for name in _TABLES]

    # --- blocks left in place by state=blocked ------------------------------------------------

    def block(self, oid: int | None) -> BlockState | None:
        if oid is None or not self._usable():
            return None
        row = self.conn.execute(
            sql.SQL("SELECT block_state FROM {} WHERE datoid = %s").format(_table("blocks")), (oid,)
        ).fetchone()
        return BlockState.from_json(row[0]) if row else None

    def set_block(self, oid: int, datname: str, state: BlockState) -> None:
        self.ensure()
        execute(
            self.conn,
            sql.SQL("INSERT INTO {} VALUES (%s, %s, %s) ON CONFLICT (datoid) DO UPDATE SET "
                    "block_state = EXCLUDED.block_state").format(_table("blocks")),
            "cannot record the block",
            (oid, datname, state.to_json()),
        )  # fmt: skip

    def clear_block(self, oid: int) -> None:
        if self._usable():
            execute(self.conn, sql.SQL("DELETE FROM {} WHERE datoid = %s").format(_table("blocks")), "records", (oid,))


# --- the per-database lock -----------------------------------------------------------------------


def _holders(conn: Any, db: str, key_class: int = LOCK_CLASS) -> list[tuple[int, bool, bool]]:
    """Backends holding our lock key for db in any database: (pid, privileged, in this database)."""
    rows = conn.execute(
        "SELECT l.pid, coalesce(r.rolsuper OR r.rolname = current_user, false), "
        "l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()) "
        "FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid "
        "LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.usesysid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.pid <> pg_catalog.pg_backend_pid() "
        "AND l.classid::bigint = %s "
        "AND l.objid::bigint = (pg_catalog.hashtext(%s)::bigint + 4294967296) %% 4294967296",
        (key_class, db),
    ).fetchall()
    return [(int(r[0]), bool(r[1]), bool(r[2])) for r in rows]


def lock_holders(conn: Any, db: str) -> list[int]:
    """The backends of other restores of db holding its lock now (what acquire_lock would wait for)."""
    return [pid for pid, privileged, _here in _holders(conn, db) if privileged]


def acquire_lock(conn: Any, db: str, timeout: float) -> list[str]:
    """A session-level advisory lock per target database, gone with the connection (even on SIGKILL).

    Only a holder that is a superuser or the login role itself counts, in whatever database it
    holds the key: an unprivileged role that takes the key to deny restores has its session
    ended. Returns warnings for the operator.
    """
    warnings: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        got = conn.execute("SELECT pg_catalog.pg_try_advisory_lock(%s, pg_catalog.hashtext(%s))", (LOCK_CLASS, db))
        mine = bool(got.fetchone()[0])
        holders = _holders(conn, db)
        rivals = [pid for pid, privileged, _here in holders if privileged]
        if mine and not rivals:
            return warnings
        if mine:  # a restore of the same database through another maintenance database
            conn.execute("SELECT pg_catalog.pg_advisory_unlock(%s, pg_catalog.hashtext(%s))", (LOCK_CLASS, db))
        squatters = [pid for pid, privileged, here in holders if not privileged and here]
        if not mine and not rivals and squatters:
            execute(conn, "SELECT pg_catalog.pg_terminate_backend(p) FROM pg_catalog.unnest(%s::int[]) p",
                    "cannot end a session holding the restore lock", (squatters,))  # fmt: skip
            warnings.append(f'ended session(s) {squatters} of unprivileged roles holding the restore lock of "{db}"')
        if time.monotonic() >= deadline:
            holders_text = ", ".join(map(str, rivals or squatters)) or "gone"
            raise PgOpsError(
                f'another restore of database "{db}" is running (backend pid {holders_text}); '
                "nothing was changed. Wait for it, or set lock_timeout to queue behind it",
                sqlstate=LOCK_NOT_AVAILABLE,
            )
        time.sleep(0.1 if squatters else 0.25)


def wait_for_prune(conn: Any, db: str, timeout: float) -> None:
    """Wait until the background drop of db's old copies by an earlier run ended (pruner.py).

    Only a holder that is a superuser or the login role counts, as for the lock: another role taking
    the key delays nobody.
    """
    started = time.monotonic()
    while True:
        pids = [pid for pid, privileged, _here in _holders(conn, db, PRUNE_CLASS) if privileged]
        if not pids:
            return
        if time.monotonic() - started >= timeout:
            raise PgOpsError(
                f'the old copies of "{db}" that the last run handed to a background drop (backend pid '
                f"{', '.join(map(str, pids))}) are still being dropped after {timeout:g} s; nothing was changed. "
                "See what that session waits for in pg_stat_activity, then run again",
                sqlstate=LOCK_NOT_AVAILABLE,
            )
        time.sleep(0.05)
