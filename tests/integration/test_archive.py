"""A large table's rows read out of a custom archive here are, byte for byte, the rows pg_restore prints; archives
this reader does not know are left to pg_restore, and a damaged one fails with what to run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.archive import CustomArchive, NotReadableHere
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from tests.conftest import drop_database
from tests.harness.pg import PgServer, client_bindir, start_server
from tests.integration.test_parallel_load import SOURCE_SQL, source  # noqa: F401 - a fixture
from tests.integration.test_preflight import DEBIAN_15_BIN

pytestmark = pytest.mark.newest_major
TABLE = ("odd schema", "Events")


def pg_dump(pg: PgServer, db: str, dest: Path, *args: str, bindir: Path | None = None) -> Path:
    argv = [str((bindir or client_bindir()) / "pg_dump"), "-Fc", *args, "-d", db]
    with open(dest, "wb") as out:  # "piped": pg_dump writes to a pipe, so no data offsets are recorded
        if "piped" in args:
            argv.remove("piped")
            dumper = subprocess.Popen(argv, stdout=subprocess.PIPE, env=pg.client_env())
            subprocess.run(["cat"], stdin=dumper.stdout, stdout=out, check=True)
            assert dumper.wait() == 0
        else:
            subprocess.run([*argv, "-f", str(dest)], env=pg.client_env(), check=True)
    return dest


def read_here(dump: Path) -> tuple[bytes, dict[str, str]] | None:
    """The table's data as this reader gives it, in odd-sized pieces, and its settings; None if left to pg_restore.
    pg_dump wrote the COPY text with its end marker."""
    fd = os.open(dump, os.O_RDONLY)
    try:
        data = CustomArchive(fd).table_data(*TABLE)
        if data is None:
            return None
        out, buf = bytearray(), bytearray(100_003)
        while True:
            n = data.readinto(memoryview(buf))
            if not n:
                return bytes(out), data.settings
            out += buf[:n]
    finally:
        os.close(fd)


def printed_by_pg_restore(dump: Path) -> bytes:
    text = subprocess.run([str(client_bindir() / "pg_restore"), "--data-only", "-n", TABLE[0], "-t", TABLE[1],
                           "-f", "-", str(dump)], check=True, capture_output=True).stdout  # fmt: skip
    start = text.index(b"\n", text.index(b'\nCOPY "odd schema"."Events"') + 1) + 1
    return text[start : text.index(b"\n\\.\n", start) + 1]


@pytest.mark.parametrize("args", [(), ("-Z0",), ("-Z9",)], ids=["gzip", "uncompressed", "gzip-9"])
def test_rows_read_here_are_the_rows_pg_restore_prints(pg: PgServer, source: str, tmp_path: Path, args):  # noqa: F811
    dump = pg_dump(pg, source, tmp_path / "events.pgc", *args)
    rows, settings = read_here(dump)
    assert rows.count(b"\n") >= 60000 and rows == printed_by_pg_restore(dump) + b"\\.\n\n\n"
    assert settings["client_encoding"] == "UTF8" and settings["search_path"] == "" and settings["row_security"] == "off"


def test_an_archive_of_pg_dump_15_format_1_14_is_read_here(tmp_path: Path):
    if not (DEBIAN_15_BIN / "pg_dump").exists():
        pytest.skip("needs the Debian postgresql-client-15 package (pg_dump 15 writes archive format 1.14)")
    old = start_server(15)
    try:
        old.sql("CREATE DATABASE split_source")
        old.sql(SOURCE_SQL, dbname="split_source")
        dump = pg_dump(old, "split_source", tmp_path / "events-15.pgc", bindir=DEBIAN_15_BIN)
        assert dump.read_bytes()[5:7] == b"\x01\x0e"
        rows, _settings = read_here(dump)
        assert rows == printed_by_pg_restore(dump) + b"\\.\n\n\n"
    finally:
        drop_database(old, "split_source")
        old.destroy()


def test_archives_this_reader_does_not_know_are_left_to_pg_restore(pg: PgServer, source: str, tmp_path: Path):  # noqa: F811
    assert read_here(pg_dump(pg, source, tmp_path / "piped.pgc", "piped")) is None  # no data offsets recorded
    fd = os.open(pg_dump(pg, source, tmp_path / "events.tar", "-Ft"), os.O_RDONLY)
    try:
        with pytest.raises(NotReadableHere):
            CustomArchive(fd)
    finally:
        os.close(fd)


def test_a_cut_archive_fails_with_what_to_run(pg: PgServer, source: str, tmp_path: Path):  # noqa: F811
    dump = pg_dump(pg, source, tmp_path / "events.pgc")
    whole = dump.read_bytes()
    dump.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(PgOpsError, match=r"odd schema\.Events cannot be read: .*pg_restore --data-only -f /dev/null"):
        read_here(dump)
