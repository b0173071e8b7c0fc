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


@pytest.mark.parametrize(
    "state",
    [
        BlockState("allow_connections", closed=False),
        BlockState("allow_connections", closed=True),
        BlockState("revoke_connect", closed=False, grants=(("PUBLIC", False), ('app "x"', True), ("ü", False))),
        BlockState("revoke_connect", closed=True),
    ],
)
def test_block_state_json_round_trip(state: BlockState):
    again = BlockState.from_json(state.to_json())
    assert again == state
    assert isinstance(again.grants, tuple) and all(isinstance(g, tuple) for g in again.grants)


def test_block_state_from_json_is_strict_about_types():
    again = BlockState.from_json('{"method": "revoke_connect", "closed": 0, "grants": [["app", 1]]}')
    assert again == BlockState("revoke_connect", closed=False, grants=(("app", True),))
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


def test_revoke_connect_takes_and_gives_back_exactly_the_grants_found():
    m = RevokeConnect()
    state = BlockState(m.name, closed=False, grants=(("PUBLIC", False), ("app", True), ('we"ird', False)))
    assert [repr(s) for s in m.close_sql(DB, state)] == [
        "Composed([SQL('REVOKE CONNECT ON DATABASE '), Identifier('hoge \"db\"; ü'), SQL(' FROM '), SQL('PUBLIC')])",
        "Composed([SQL('REVOKE CONNECT ON DATABASE '), Identifier('hoge \"db\"; ü'), SQL(' FROM '), "
        "Identifier('app')])",
        "Composed([SQL('REVOKE CONNECT ON DATABASE '), Identifier('hoge \"db\"; ü'), SQL(' FROM '), "
        "Identifier('we\"ird')])",
    ]
    assert [repr(s) for s in m.open_sql(DB, state)] == [
        "Composed([SQL('GRANT CONNECT ON DATABASE '), Identifier('hoge \"db\"; ü'), SQL(' TO '), SQL('PUBLIC'), "
        "SQL('')])",
        "Composed([SQL('GRANT CONNECT ON DATABASE '), Identifier('hoge \"db\"; ü'), SQL(' TO '), Identifier('app'), "
        "SQL(' WITH GRANT OPTION')])",
        "Composed([SQL('GRANT CONNECT ON DATABASE '), Identifier('hoge \"db\"; ü'), SQL(' TO '), "
        "Identifier('we\"ird'), SQL('')])",
    ]
    nothing = BlockState(m.name, closed=True)
    assert m.close_sql(DB, nothing) == [] and m.open_sql(DB, nothing) == []


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
