"""blocking.py without a server: the state a method snapshots, the statements it renders, which method a server gets.

Rendering a statement to text takes a connection on some psycopg versions, so the statements are
checked by their structure (repr of the Composed: the quoting is then psycopg's, from Identifier);
tests/integration/test_terminate.py runs them against real servers.
"""

from __future__ import annotations

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import (
    CHOICES,
    METHODS,
    AllowConnections,
    BlockState,
    RevokeConnect,
    best_method,
    block_method,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError, ServerInfo

DB = 'hoge "db"; ü'


def info(version_num: int) -> ServerInfo:
    return ServerInfo(version_num=version_num, version=f"{version_num // 10000}.x", is_superuser=True,
                      current_user="postgres")  # fmt: skip


ACL = ((None, "TEMPORARY", False), (None, "CONNECT", False), ("owner", "CONNECT", False),
       ('app "x"', "CONNECT", True), ("PUBLIC", "CONNECT", False))  # fmt: skip


@pytest.mark.parametrize(
    "state",
    [
        BlockState("allow_connections", closed=False),
        BlockState("allow_connections", closed=True),
        BlockState("revoke_connect", closed=False, acl=ACL, null_acl=True, superuser=True),
        BlockState("revoke_connect", closed=True),
    ],
)
def test_block_state_json_round_trip(state: BlockState):
    again = BlockState.from_json(state.to_json())
    assert again == state
    assert isinstance(again.acl, tuple) and all(isinstance(a, tuple) for a in again.acl)


def test_block_state_from_json_is_strict_about_types():
    again = BlockState.from_json('{"method": "revoke_connect", "closed": 0, "acl": [["app", "CONNECT", 1]]}')
    assert again == BlockState("revoke_connect", closed=False, acl=(("app", "CONNECT", True),))
    with pytest.raises(KeyError, match="closed"):
        BlockState.from_json('{"method": "revoke_connect"}')


def test_methods_and_choices():
    assert CHOICES == ("allow_connections", "revoke_connect")
    assert METHODS == {"allow_connections": AllowConnections, "revoke_connect": RevokeConnect}


def test_allow_connections_statements():
    m = AllowConnections()
    open_state = BlockState(m.name, closed=False)
    [close] = m.close_sql(DB, open_state)
    assert repr(close) == (
        "Composed([SQL('ALTER DATABASE '), Identifier('hoge \"db\"; ü'), SQL(' ALLOW_CONNECTIONS false')])"
    )
    [reopen] = m.open_sql(DB, open_state)
    assert repr(reopen) == (
        "Composed([SQL('ALTER DATABASE '), Identifier('hoge \"db\"; ü'), SQL(' ALLOW_CONNECTIONS true')])"
    )
    # closed before we came: giving back means leaving it closed
    assert m.open_sql(DB, BlockState(m.name, closed=True)) == []


def test_revoke_connect_takes_connect_and_gives_back_the_whole_acl_in_its_order():
    m = RevokeConnect()
    state = BlockState(m.name, closed=False, acl=ACL)
    assert state.connect_grantees == [None, "owner", 'app "x"', "PUBLIC"]
    q = "Identifier('hoge \"db\"; ü')"
    assert [repr(s) for s in m.close_sql(DB, state)] == [
        f"Composed([SQL('REVOKE CONNECT ON DATABASE '), {q}, SQL(' FROM '), SQL('PUBLIC')])",
        f"Composed([SQL('REVOKE CONNECT ON DATABASE '), {q}, SQL(' FROM '), Identifier('owner')])",
        f"Composed([SQL('REVOKE CONNECT ON DATABASE '), {q}, SQL(' FROM '), Identifier('app \"x\"')])",
        # a role that is named PUBLIC is a role, not everybody
        f"Composed([SQL('REVOKE CONNECT ON DATABASE '), {q}, SQL(' FROM '), Identifier('PUBLIC')])",
    ]
    reopen = [repr(s) for s in m.open_sql(DB, state)]
    head = f"Composed([SQL('REVOKE ALL ON DATABASE '), {q}, SQL(' FROM '), "
    assert reopen[0].startswith(head + "Composed([SQL('PUBLIC')")
    assert "Identifier('PUBLIC')])" in reopen[0] and reopen[0].endswith("SQL(' CASCADE')])")
    granted = [r.split("SQL(' TO '), ")[1] for r in reopen[1:]]
    assert granted == [
        "SQL('PUBLIC'), SQL('')])",
        "Identifier('owner'), SQL('')])",
        "Identifier('app \"x\"'), SQL(' WITH GRANT OPTION')])",
        "Identifier('PUBLIC'), SQL('')])",
    ]
    assert "SQL('TEMPORARY'), SQL(', '), SQL('CONNECT')" in reopen[1]  # PUBLIC's privileges in their order
    nothing = BlockState(m.name, closed=True)
    assert m.close_sql(DB, nothing) == [] and m.open_sql(DB, nothing) == []


def test_revoke_connect_puts_a_default_acl_back_as_null():
    m = RevokeConnect()
    [stmt] = m.open_sql(DB, BlockState(m.name, closed=False, acl=ACL, null_acl=True, superuser=True))
    assert repr(stmt).startswith("Composed([SQL('UPDATE pg_catalog.pg_database SET datacl = NULL WHERE datname = ')")
    # a login role that is not a superuser grants the defaults back explicitly instead
    assert len(m.open_sql(DB, BlockState(m.name, closed=False, acl=ACL, null_acl=True))) == 5


def test_block_method_by_name():
    assert isinstance(block_method("allow_connections"), AllowConnections)
    assert isinstance(block_method("revoke_connect", info(80400)), RevokeConnect)
    with pytest.raises(PgOpsError, match=r"must be one of \['allow_connections', 'revoke_connect'\], not 'kill'"):
        block_method("kill")


def test_allow_connections_needs_9_5():
    block_method("allow_connections", info(90500))
    needs = r"cannot block with allow_connections \(needs 9\.5\+\): use block_new_connections=revoke_connect$"
    with pytest.raises(PgOpsError, match=needs):
        block_method("allow_connections", info(90424))


def test_best_method_falls_back_on_old_servers():
    assert best_method(info(180000), "allow_connections").name == "allow_connections"
    assert best_method(info(100000), "revoke_connect").name == "revoke_connect"
    assert best_method(info(90424), "allow_connections").name == "revoke_connect"
