# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ways to close a database to new connections, one class each.

A method snapshots what it will change (so it can give back exactly that), closes, reopens and
tells whether a snapshot is closed. The module options, the kill guard, the switch and the
rollback SQL all go through these objects. A new method is one subclass added to METHODS.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
    # revoke_connect: the whole ACL in its order, as (grantee, privilege, grantable); None is PUBLIC
    acl: tuple[tuple[str | None, str, bool], ...] = ()
    null_acl: bool = False  # datacl was NULL (the defaults)
    superuser: bool = False  # the login role may put a NULL datacl back

    @property
    def connect_grantees(self) -> list[str | None]:
        return [g for g, priv, _grantable in self.acl if priv == "CONNECT"]

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "closed": self.closed, "acl": [list(a) for a in self.acl],
                           "null_acl": self.null_acl, "superuser": self.superuser})  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> BlockState:
        data = json.loads(text)
        acl = tuple((g, str(p), bool(o)) for g, p, o in data.get("acl", []))
        return cls(data["method"], bool(data["closed"]), acl, bool(data.get("null_acl")), bool(data.get("superuser")))


class BlockMethod:
    name = ""
    min_version = 0  # server_version_num that introduced it

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

    def snapshot(self, conn: Any, db: str) -> BlockState:
        head = conn.execute(
            "SELECT d.datacl IS NULL, (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) "
            "FROM pg_catalog.pg_database d WHERE d.datname = %s",
            (db,),
        ).fetchone()
        if head is None:
            raise PgOpsError(f'database "{db}" does not exist')
        acl = read_acl(conn, db, defaults=True)
        closed = not any(priv == "CONNECT" for _g, priv, _o in acl)
        return BlockState(self.name, closed, acl, null_acl=bool(head[0]), superuser=bool(head[1]))

    def close_sql(self, db: str, state: BlockState) -> list[Any]:
        return [
            sql.SQL("REVOKE CONNECT ON DATABASE {} FROM {}").format(ident(db), _grantee(g))
            for g in state.connect_grantees
        ]

    def open_sql(self, db: str, state: BlockState) -> list[Any]:
        """The ACL as it was, byte for byte: emptied, then granted again in its order (or NULL again)."""
        if state.closed or not state.acl:
            return []
        if state.null_acl and state.superuser:
            return [
                sql.SQL("UPDATE pg_catalog.pg_database SET datacl = NULL WHERE datname = {}").format(sql.Literal(db))
            ]
        grantees = list(dict.fromkeys(g for g, _p, _o in state.acl))
        revoke = sql.SQL("REVOKE ALL ON DATABASE {} FROM {} CASCADE").format(
            ident(db), sql.SQL(", ").join(_grantee(g) for g in grantees))  # fmt: skip
        return [revoke, *grant_sql(db, state.acl)]


def read_acl(conn: Any, db: str, defaults: bool) -> tuple[tuple[str | None, str, bool], ...]:
    """db's ACL in its order as (grantee, privilege, grantable), None for PUBLIC; with defaults, a NULL
    datacl reads as the defaults it stands for, else as no entries."""
    acl = "coalesce(d.datacl, pg_catalog.acldefault('d', d.datdba))" if defaults else "d.datacl"
    rows = conn.execute(
        "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(a.grantee) END, "
        f"a.privilege_type, a.is_grantable FROM pg_catalog.pg_database d, pg_catalog.aclexplode({acl}) "
        "WITH ORDINALITY a WHERE d.datname = %s ORDER BY a.ordinality",
        (db,),
    ).fetchall()
    return tuple((r[0], r[1], bool(r[2])) for r in rows)


def grant_sql(db: str, acl: Sequence[tuple[str | None, str, bool]]) -> list[Any]:
    """The GRANTs that rebuild acl on an emptied ACL, its grantees in their order (so datacl comes out the same)."""
    stmts = []
    for grantee in dict.fromkeys(g for g, _p, _o in acl):
        for grantable in (False, True):
            privs = [p for g, p, o in acl if g == grantee and o == grantable]
            if privs:
                stmts.append(sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                    sql.SQL(", ").join(sql.SQL(p) for p in privs), ident(db), _grantee(grantee),
                    sql.SQL(" WITH GRANT OPTION" if grantable else "")))  # fmt: skip
    return stmts


def _grantee(name: str | None) -> Any:
    """None is PUBLIC; a role that happens to be named "PUBLIC" stays a quoted role name."""
    return sql.SQL("PUBLIC") if name is None else ident(name)


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
