"""A rerun decides "same dump" from the file's identity (no read at any size), and hashes when it changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.registry import LOCK_CLASS
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from tests.harness.pg import PgServer, client_bindir
from tests.integration.test_restore import restore

pytestmark = pytest.mark.newest_major

ROWS = 120_000  # ~12 MB of COPY data: a full read is plain to see next to the few kB a rerun reads


def plain_dump(path: Path, first: str) -> Path:
    """A plain dump whose first row is `first`; equal lengths of `first` give equal file sizes."""
    rows = "".join(f"{i}\t{'x' * 90}\n" for i in range(ROWS))
    path.write_text(f"CREATE TABLE t (k text, v text);\nCOPY t (k, v) FROM stdin;\n{first}\tfirst\n{rows}\\.\n")
    return path


def bytes_read() -> int:
    """Bytes this process read through read(2)/pread(2) so far (files and sockets)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def rerun(pg: PgServer, db: str, dump: Path, **kw):
    before = bytes_read()
    res = restore(pg, db, dump, keep_previous=0, **kw)
    return res, bytes_read() - before


def first_row(pg: PgServer, db: str) -> str:
    return pg.sql("SELECT k FROM t WHERE v = 'first'", dbname=db)[0][0]


def test_rerun_by_identity_reads_nothing_and_a_changed_file_is_restored(pg: PgServer, dbname: str, tmp_path: Path):
    dump = plain_dump(tmp_path / "hoge.sql", "aaaa")
    size = dump.stat().st_size
    first = rerun(pg, dbname, dump)[0]
    assert first.changed and first.checksum_by == "full" and first_row(pg, dbname) == "aaaa"

    same, read = rerun(pg, dbname, dump)
    assert not same.changed and same.checksum_by == "identity" and same.sha256 == first.sha256
    assert read < size // 20, f"a rerun by identity read {read} bytes of a {size}-byte dump"
    assert "same file, not read again" in same.log[-1]

    full, read = rerun(pg, dbname, dump, verify_checksum="full")  # the measure sees a whole read
    assert not full.changed and full.checksum_by == "full" and read >= size

    # rewritten in place, same size, its mtime put back: only the change time tells
    st = dump.stat()
    plain_dump(dump, "bbbb")
    os.utime(dump, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (dump.stat().st_ino, dump.stat().st_size, dump.stat().st_mtime_ns) == (st.st_ino, size, st.st_mtime_ns)
    rewritten = rerun(pg, dbname, dump)[0]
    assert rewritten.changed and rewritten.checksum_by == "full" and first_row(pg, dbname) == "bbbb"

    # replaced by another file of the same size and mtime (a new inode)
    st = dump.stat()
    other = plain_dump(tmp_path / "hoge.sql.new", "cccc")
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    other.replace(dump)
    replaced = rerun(pg, dbname, dump)[0]
    assert replaced.changed and replaced.checksum_by == "full" and first_row(pg, dbname) == "cccc"

    # only touched: hashed, the same dump, and its new identity recorded so the next run reads nothing
    os.utime(dump)
    touched, read = rerun(pg, dbname, dump)
    assert not touched.changed and touched.checksum_by == "full" and read >= size
    again, read = rerun(pg, dbname, dump)
    assert not again.changed and again.checksum_by == "identity" and read < size // 20


def test_records_of_an_older_version_fall_back_to_the_hash(pg: PgServer, dbname: str, tmp_path: Path):
    dump = plain_dump(tmp_path / "hoge.sql", "aaaa")
    assert rerun(pg, dbname, dump)[0].changed
    pg.sql("ALTER TABLE pgops_dbrestore.restored DROP COLUMN identity")  # as an older version made it
    old, read = rerun(pg, dbname, dump)
    assert not old.changed and old.checksum_by == "full" and read >= dump.stat().st_size
    columns = pg.sql("SELECT attname FROM pg_attribute WHERE attrelid = 'pgops_dbrestore.restored'::regclass")
    assert ("identity",) in columns  # added back, the rows kept
    assert old.marker_before["sha256"] == old.sha256
    new, read = rerun(pg, dbname, dump)
    assert not new.changed and new.checksum_by == "identity" and read < dump.stat().st_size // 20


def test_check_mode_names_another_restore_holding_the_lock(pg: PgServer, dbname: str, tmp_path: Path):
    """The role takes a dry run that finds nothing to do as the rerun's answer only when busy_pids is empty: while
    another restore of the database holds its lock, a real run would wait for it (or fail at lock_timeout 0)."""
    dump = plain_dump(tmp_path / "a.sql", "a")
    restore(pg, dbname, dump)
    idle = restore_database(pg.params(), RestoreRequest(db=dbname, src=str(dump), bindir=str(client_bindir())),
                            check_mode=True)  # fmt: skip
    assert idle.plan == [] and idle.busy_pids == []
    with pg.connect() as other:  # a restore of the same database through the same login, holding its lock
        other_pid = other.execute("SELECT pg_catalog.pg_backend_pid()").fetchone()[0]
        other.execute("SELECT pg_catalog.pg_advisory_lock(%s, pg_catalog.hashtext(%s))", (LOCK_CLASS, dbname))
        busy = restore_database(pg.params(), RestoreRequest(db=dbname, src=str(dump), bindir=str(client_bindir())),
                                check_mode=True)  # fmt: skip
        assert busy.plan == [] and busy.busy_pids == [other_pid]
        with pytest.raises(PgOpsError, match="another restore of database"):
            restore(pg, dbname, dump)  # what the real run does meanwhile (lock_timeout 0)
