"""A large table's rows read out of a custom or directory archive here are, byte for byte, the rows pg_restore
prints; archives this reader does not know are left to pg_restore, and a damaged one fails with what to run."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.archive import Archive, NotReadableHere
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from tests.conftest import drop_database
from tests.harness.pg import PgServer, client_bindir, start_server
from tests.integration.test_parallel_load import SOURCE_SQL, source
from tests.integration.test_preflight import DEBIAN_15_BIN

pytestmark = pytest.mark.newest_major
__all__ = ["source"]  # the fixture
TABLE = ("odd schema", "Events")


def pg_dump(pg: PgServer, db: str, dest: Path, *args: str, bindir: Path | None = None) -> Path:
    """A custom archive (-Fc unless args say -Fd or -Ft); "piped": written to a pipe, which records no data offsets."""
    argv = [str((bindir or client_bindir()) / "pg_dump"), "-Fc", *args, "-d", db]
    if "piped" in args:
        argv.remove("piped")
        with open(dest, "wb") as out:
            dumper = subprocess.Popen(argv, stdout=subprocess.PIPE, env=pg.client_env())
            shutil.copyfileobj(dumper.stdout, out)  # type: ignore[arg-type]
            assert dumper.wait() == 0
    else:
        subprocess.run([*argv, "-f", str(dest)], env=pg.client_env(), check=True)
    return dest


def read_here(dump: Path) -> tuple[bytes, dict[str, str]] | None:
    """The table's data as this reader gives it, in odd-sized pieces, and its settings; None if left to pg_restore.
    pg_dump wrote the COPY text with its end marker."""
    fd = os.open(dump, os.O_RDONLY)
    try:
        data = Archive(fd, directory=dump.is_dir()).table_data(*TABLE)
        if data is None:
            return None
        out, buf = bytearray(), bytearray(100_003)
        while True:
            n = data.readinto(memoryview(buf))
            if not n:
                data.close()
                return bytes(out), data.settings
            out += buf[:n]
    finally:
        os.close(fd)


def printed_by_pg_restore(dump: Path) -> bytes:
    text = subprocess.run([str(client_bindir() / "pg_restore"), "--data-only", "-n", TABLE[0], "-t", TABLE[1],
                           "-f", "-", str(dump)], check=True, capture_output=True).stdout  # fmt: skip
    start = text.index(b"\n", text.index(b'\nCOPY "odd schema"."Events"') + 1) + 1
    return text[start : text.index(b"\n\\.\n", start) + 1]


@pytest.mark.parametrize("args", [(), ("-Z0",), ("-Fd",), ("-Fd", "-Z0")],
                         ids=["custom", "custom-uncompressed", "directory", "directory-uncompressed"])  # fmt: skip
def test_rows_read_here_are_the_rows_pg_restore_prints(pg: PgServer, source: str, tmp_path: Path, args):
    dump = pg_dump(pg, source, tmp_path / "events", *args)
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


def test_archives_this_reader_does_not_know_are_left_to_pg_restore(pg: PgServer, source: str, tmp_path: Path):
    assert read_here(pg_dump(pg, source, tmp_path / "piped.pgc", "piped")) is None  # no data offsets recorded
    directory = pg_dump(pg, source, tmp_path / "events.dir", "-Fd")
    for gz in directory.glob("*.dat.gz"):  # recompressed as pg_dump --compress=lz4 names them: 2583.dat.lz4
        plain = gz.with_suffix("")
        plain.write_bytes(gzip.decompress(gz.read_bytes()))
        subprocess.run(["lz4", "-q", "--rm", str(plain), str(gz.with_suffix(".lz4"))], check=True)
        gz.unlink()
    assert read_here(directory) is None
    fd = os.open(pg_dump(pg, source, tmp_path / "events.tar", "-Ft"), os.O_RDONLY)
    try:
        with pytest.raises(NotReadableHere):
            Archive(fd, directory=False)
    finally:
        os.close(fd)


def test_a_directory_archives_data_file_is_never_read_through_a_symlink(pg: PgServer, source: str, tmp_path: Path):
    directory = pg_dump(pg, source, tmp_path / "events.dir", "-Fd")
    events = max(directory.glob("*.dat.gz"), key=lambda f: f.stat().st_size)
    elsewhere = tmp_path / "elsewhere.gz"
    events.rename(elsewhere)
    events.symlink_to(elsewhere)
    with pytest.raises(PgOpsError, match=r"odd schema\.Events cannot be read: .*symbolic links"):
        read_here(directory)


def test_a_cut_archive_fails_with_what_to_run(pg: PgServer, source: str, tmp_path: Path):
    dump = pg_dump(pg, source, tmp_path / "events.pgc")
    whole = dump.read_bytes()
    dump.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(PgOpsError, match=r"odd schema\.Events cannot be read: .*pg_restore --data-only -f /dev/null"):
        read_here(dump)
