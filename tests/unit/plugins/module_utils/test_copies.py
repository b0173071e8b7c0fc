"""copies.py without a server: the names of the copies a restore makes, and how stored settings are split.

free_name needs the server's list of databases: the integration tests cover it.
"""

from __future__ import annotations

import re

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.copies import (
    MAX_BASE_BYTES,
    _setting_values,
    name_base,
    previous_name,
    staging_name,
    undone_name,
    utc_stamp,
)

NAMEDATALEN = 63  # PostgreSQL truncates longer identifiers (bytes, not characters)
STAMP = "20261125T101010123Z"


def test_short_names_are_kept_as_they_are():
    assert name_base("hoge_db") == "hoge_db"
    assert staging_name("hoge_db") == "hoge_db_pgops_staging"
    assert previous_name("hoge_db", STAMP) == f"hoge_db_prev_{STAMP}"
    assert undone_name("hoge_db", STAMP) == f"hoge_db_undone_{STAMP}"


@pytest.mark.parametrize("db", ["x" * 63, "ü" * 31, "日本語" * 7, "a" * 36 + "ü", 'hoge "db"; -- ü ' + "z" * 40])
def test_every_name_fits_63_bytes(db: str):
    base = name_base(db)
    assert len(base.encode()) <= MAX_BASE_BYTES
    for name in (staging_name(db), previous_name(db, STAMP), undone_name(db, STAMP)):
        assert len(name.encode()) <= NAMEDATALEN, name
        assert name.startswith(base)
    base.encode().decode("utf-8")  # a multibyte character is never cut in half


def test_shortened_names_stay_unique_and_stable():
    long = "ü" * 40
    assert name_base(long) == name_base(long)
    assert name_base(long) != name_base(long + "x")
    # same first bytes, different tails: the hash keeps them apart
    assert name_base("a" * 50 + "one") != name_base("a" * 50 + "two")
    # a name exactly at the limit is not shortened, one byte more is
    assert name_base("b" * MAX_BASE_BYTES) == "b" * MAX_BASE_BYTES
    assert name_base("b" * (MAX_BASE_BYTES + 1)) != "b" * (MAX_BASE_BYTES + 1)


def test_utc_stamp_is_sortable_milliseconds():
    stamp = utc_stamp()
    assert re.fullmatch(r"\d{8}T\d{9}Z", stamp), stamp
    assert len(stamp) == len(STAMP)


@pytest.mark.parametrize(
    ("name", "stored", "values"),
    [
        ("search_path", '"$user", public, "Odd, ""q"""', ["$user", "public", 'Odd, "q"']),
        ("search_path", "public", ["public"]),
        ("search_path", '"a,b"', ["a,b"]),
        ("temp_tablespaces", "fast, slow", ["fast", "slow"]),
        ("session_preload_libraries", '"$libdir/x", y', ["$libdir/x", "y"]),
        ("local_preload_libraries", "", []),
        # not a list setting: the stored value is one value, commas and quotes included
        ("statement_timeout", "5min", ["5min"]),
        ("application_name", 'a, "b"', ['a, "b"']),
    ],
)
def test_list_settings_are_split_like_postgres_stores_them(name: str, stored: str, values: list):
    assert _setting_values(name, stored) == values
