"""Dump sniffing, the plain-SQL filter and restore naming, without a server."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.dumpfile import PlainFilter, detect_format
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import (
    _setting_values,
    name_base,
    previous_name,
    staging_name,
)


def write(tmp: Path, name: str, data: bytes) -> str:
    p = tmp / name
    p.write_bytes(data)
    return str(p)


def test_detects_by_content_not_name(tmp_path: Path):
    assert detect_format(write(tmp_path, "x.sql", b"PGDMP\x01\x0e\x00")).format == "custom"
    assert detect_format(write(tmp_path, "x.dump", b"--\n-- PostgreSQL database dump\n")).format == "plain"
    assert detect_format(write(tmp_path, "x.tar", gzip.compress(b"SET client_encoding = 'UTF8';\n"))).format == (
        "plain.gz"
    )
    d = tmp_path / "dir"
    d.mkdir()
    (d / "toc.dat").write_bytes(b"PGDMP")
    assert detect_format(str(d)).format == "directory"


def test_tar_needs_toc_first(tmp_path: Path):
    def tar_with(member: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            info = tarfile.TarInfo(member)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"PGDMP"))
        return buf.getvalue()

    assert detect_format(write(tmp_path, "a", tar_with("toc.dat"))).format == "tar"
    with pytest.raises(PgOpsError, match="not a pg_dump tar-format dump"):
        detect_format(write(tmp_path, "b", tar_with("photo.jpg")))


@pytest.mark.parametrize(
    ("data", "msg"),
    [
        (b"", "is empty"),
        (b"\x89PNG\r\n\x1a\n\0\0\0", "is not a PostgreSQL dump"),
        (b"hello world, no sql here", "is not a PostgreSQL dump"),
        # mtime=0: before Python 3.11 the header holds the current time, and pytest-xdist workers must
        # build identical parameters
        (gzip.compress(b"\0\1\2binary", mtime=0), "does not hold plain SQL"),
    ],
)
def test_refuses_what_is_not_a_dump(tmp_path: Path, data: bytes, msg: str):
    with pytest.raises(PgOpsError, match=msg):
        detect_format(write(tmp_path, "f", data))


def test_missing_and_empty_directory(tmp_path: Path):
    with pytest.raises(PgOpsError, match="does not exist"):
        detect_format(str(tmp_path / "nope"))
    with pytest.raises(PgOpsError, match=r"without toc\.dat"):
        detect_format(str(tmp_path))


def filtered(sql_text: str) -> tuple[str, list[str]]:
    flt = PlainFilter()
    out = b"".join(flt.lines(io.BytesIO(sql_text.encode()))).decode()
    return out, flt.dropped


def test_filter_drops_database_statements_but_not_data_or_comments():
    text = (
        "/*\n   Drop database if it exists\n*/\n"
        "DROP DATABASE IF EXISTS chinook;\n"
        "CREATE DATABASE chinook WITH TEMPLATE = template0;\n"
        "ALTER DATABASE chinook OWNER TO app;\n"
        "\\connect chinook\n"
        "CREATE TABLE t (x text);\n"
        "COPY public.t (x) FROM stdin;\n"
        "DROP DATABASE inside copy data;\n"
        "\\c not a meta command here\n"
        "\\.\n"
        "SELECT 1;"
    )
    out, dropped = filtered(text)
    assert dropped == [
        "DROP DATABASE IF EXISTS chinook;",
        "CREATE DATABASE chinook WITH TEMPLATE = template0;",
        "ALTER DATABASE chinook OWNER TO app;",
        "\\connect chinook",
    ]
    assert "Drop database if it exists" in out and "DROP DATABASE inside copy data;" in out
    assert "\\c not a meta command here" in out and out.endswith("SELECT 1;")


def test_filter_refuses_a_multiline_database_statement():
    with pytest.raises(PgOpsError, match="multi-line database statement"):
        filtered("CREATE DATABASE x\n  TEMPLATE template0;\n")


def test_names_fit_postgres_limits():
    assert name_base("hoge_db") == "hoge_db"
    long = "ü" * 40
    base = name_base(long)
    assert len(base.encode()) <= 36 and base != name_base(long + "x")
    assert len(previous_name(long, "20261125T101010123Z").encode()) <= 63
    assert len(staging_name(long).encode()) <= 63


def test_list_settings_are_split_like_postgres_stores_them():
    assert _setting_values("search_path", '"$user", public, "Odd, ""q"""') == ["$user", "public", 'Odd, "q"']
    assert _setting_values("statement_timeout", "5min") == ["5min"]
