# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ways to close a database to new connections, one class each.

A method snapshots what it will change (so it can give back exactly that), closes, reopens and
tells whether a snapshot is closed. The module options, the kill guard, the switch and the
rollback SQL all go through these objects. A new method is one subclass added to METHODS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    PgOpsError,
    ServerInfo,
    execute,
    ident,
    sql,
)


@dataclass(frozen=True)
class BlockState:
    """What a method found on a database before closing it: enough to give exactly that back."""

    method: str
    closed: bool
    # revoke_connect: the CONNECT grants found, as (grantee or "PUBLIC", grantable)
    grants: tuple[tuple[str, bool], ...] = ()

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "closed": self.closed, "grants": [list(g) for g in self.grants]})

    @classmethod
    def from_json(cls, text: str) -> BlockState:
        data = json.loads(text)
        return cls(data["method"], bool(data["closed"]), tuple((str(g), bool(o)) for g, o in data["grants"]))


class BlockMethod:
    name = ""
    min_version = 0  # server_version_num that introduced it
    summary = ""

    def check_supported(self, info: ServerInfo) -> None:
        if info.version_num < self.min_version:
            raise PgOpsError(
                f"PostgreSQL {info.version} cannot block with {self.name} (needs {self.min_version // 10000}"
                f".{self.min_version // 100 % 100}+): use block_new_connections="
                + ", ".join(m for m, cls in METHODS.items() if cls.min_version <= info.version_num)
            )

    def snapshot(self, conn: Any, db: str) -> BlockState:
        raise NotImplementedError

    def close_sql(self, db: str, state: BlockState) -> list[Any]:
        raise NotImplementedError

    def open_sql(self, db: str, state: BlockState) -> list[Any]:
        """Statements that give back what close_sql took (nothing when the database was closed already)."""
        raise NotImplementedError

    def close(self, conn: Any, db: str, state: BlockState) -> None:
        for stmt in self.close_sql(db, state):
            execute(conn, stmt, f'cannot close database "{db}" to new connections ({self.name})')

    def open(self, conn: Any, db: str, state: BlockState) -> None:
        for stmt in self.open_sql(db, state):
            execute(conn, stmt, f'cannot reopen database "{db}" to new connections ({self.name})')


class AllowConnections(BlockMethod):
    """ALTER DATABASE … ALLOW_CONNECTIONS false: nobody, superusers included, can connect."""

    name = "allow_connections"
    min_version = 90500
    summary = "ALTER DATABASE … ALLOW_CONNECTIONS false (9.5+; blocks every role)"

    def snapshot(self, conn: Any, db: str) -> BlockState:
        row = conn.execute("SELECT datallowconn FROM pg_catalog.pg_database WHERE datname = %s", (db,)).fetchone()
        if row is None:
            raise PgOpsError(f'database "{db}" does not exist')
        return BlockState(self.name, closed=not row[0])

    def close_sql(self, db: str, state: BlockState) -> list[Any]:
        return [sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(ident(db))]

    def open_sql(self, db: str, state: BlockState) -> list[Any]:
        if state.closed:
            return []
        return [sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(ident(db))]


class RevokeConnect(BlockMethod):
    """REVOKE CONNECT from every grantee that holds it; superusers still connect. Any version."""

    name = "revoke_connect"
    summary = "REVOKE CONNECT from every role that has it, given back exactly (any version; superusers pass)"

    def snapshot(self, conn: Any, db: str) -> BlockState:
        rows = conn.execute(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(a.grantee) END, "
            "a.is_grantable FROM pg_catalog.pg_database d, "
            "pg_catalog.aclexplode(coalesce(d.datacl, pg_catalog.acldefault('d', d.datdba))) a "
            "WHERE d.datname = %s AND a.privilege_type = 'CONNECT' ORDER BY 1",
            (db,),
        ).fetchall()
        if (
            not rows
            and conn.execute("SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (db,)).fetchone() is None
        ):
            raise PgOpsError(f'database "{db}" does not exist')
        return BlockState(self.name, closed=not rows, grants=tuple((r[0], bool(r[1])) for r in rows))

    def close_sql(self, db: str, state: BlockState) -> list[Any]:
        return [
            sql.SQL("REVOKE CONNECT ON DATABASE {} FROM {}").format(ident(db), _grantee(g))
            for g, _grantable in state.grants
        ]

    def open_sql(self, db: str, state: BlockState) -> list[Any]:
        return [
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}{}").format(
                ident(db), _grantee(g), sql.SQL(" WITH GRANT OPTION" if grantable else "")
            )
            for g, grantable in state.grants
        ]


def _grantee(name: str) -> Any:
    return sql.SQL("PUBLIC") if name == "PUBLIC" else ident(name)


METHODS: dict[str, type[BlockMethod]] = {cls.name: cls for cls in (AllowConnections, RevokeConnect)}
CHOICES = tuple(METHODS)


def block_method(name: str, info: ServerInfo | None = None) -> BlockMethod:
    """The method called name, checked against the server when info is given."""
    if name not in METHODS:
        raise PgOpsError(f"block_new_connections must be one of {list(CHOICES)}, not {name!r}")
    method = METHODS[name]()
    if info is not None:
        method.check_supported(info)
    return method


def best_method(info: ServerInfo, wanted: str) -> BlockMethod:
    """wanted, or the first method this server has when it lacks wanted (ALLOW_CONNECTIONS before 9.5)."""
    if info.version_num >= METHODS[wanted].min_version:
        return METHODS[wanted]()
    return next(cls() for cls in METHODS.values() if info.version_num >= cls.min_version)


def block_argument_spec(choices: tuple[str, ...], default: str) -> dict[str, dict[str, Any]]:
    """block_new_connections, and the option it replaced (documented per module)."""
    return dict(
        block_new_connections=dict(type="str", default=default, choices=list(choices)),
        # revoke_connect now revokes from every grantee and gives exactly those grants back
        block_roles=dict(
            type="list",
            elements="str",
            default=[],
            removed_in_version="1.0.0",
            removed_from_collection="pgops.dbrestore",
        ),
    )
