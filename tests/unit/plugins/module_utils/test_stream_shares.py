"""How a source's tables are shared out among the parallel data streams, and named to pg_dump."""

from __future__ import annotations

from ansible_collections.pgops.dbrestore.plugins.module_utils.stream import share_tables, table_pattern


def test_shares_balance_bytes_largest_first_and_the_first_takes_the_rest():
    tables = [("public", "events", 900), ("public", "users", 500), ("public", "orders", 400), ("app", "tiny", 0)]
    assert share_tables(tables, 2) == [[("public", "events"), ("app", "tiny")],
                                       [("public", "users"), ("public", "orders")]]  # fmt: skip


def test_empty_shares_are_left_out():
    assert share_tables([("public", "only", 10)], 4) == [[("public", "only")]]
    assert share_tables([], 3) == [[]]


def test_patterns_match_one_table_whatever_its_name_holds():
    assert table_pattern("public", "events") == '"public"."events"'
    assert table_pattern("my.schema", 'Odd"Name*?') == '"my.schema"."Odd""Name*?"'
