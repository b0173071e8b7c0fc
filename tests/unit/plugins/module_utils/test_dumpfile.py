"""dumpfile.py without a server: what a dump is (by content), its fingerprint, and the plain-SQL filter."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.dumpfile import DumpSource, PlainFilter
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError

PLAIN = b"--\n-- PostgreSQL database dump\n--\n\nSET client_encoding = 'UTF8';\nCREATE TABLE t (x text);\n"


def write(tmp: Path, name: str, data: bytes) -> str:
    p = tmp / name
    p.write_bytes(data)
    return str(p)


def sniff(path: str) -> str:
    with DumpSource(path) as dump:
        return dump.format


def tar_with(member: str, data: bytes = b"PGDMP") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_format_by_content_not_by_name(tmp_path: Path):
    assert sniff(write(tmp_path, "x.sql", b"PGDMP\x01\x0e\x00")) == "custom"
    assert sniff(write(tmp_path, "x.dump", PLAIN)) == "plain"
    assert sniff(write(tmp_path, "x.tar", gzip.compress(PLAIN, mtime=0))) == "plain.gz"
    assert sniff(write(tmp_path, "x.gz", tar_with("toc.dat"))) == "tar"
    d = tmp_path / "dir.sql.gz"
    d.mkdir()
    (d / "toc.dat").write_bytes(b"PGDMP")
    assert sniff(str(d)) == "directory"


@pytest.mark.parametrize(("tool", "fmt"), [("zstd", "plain.zst"), ("lz4", "plain.lz4")])
def test_compressed_plain_needs_and_uses_the_cli(tmp_path: Path, tool: str, fmt: str):
    if shutil.which(tool) is None:
        pytest.skip(f"the {tool} command is not installed")
    raw = Path(write(tmp_path, "raw.sql", PLAIN))
    out = tmp_path / "x.bin"
    argv = [tool, "-q", "-f", str(raw), "-o", str(out)] if tool == "zstd" else [tool, "-q", "-f", str(raw), str(out)]
    subprocess.run(argv, check=True)
    with DumpSource(str(out)) as dump:
        assert dump.format == fmt and not dump.is_archive
        with dump.plain_stream() as stream:
            assert stream.read(-1) == PLAIN


def test_tar_needs_toc_first(tmp_path: Path):
    assert sniff(write(tmp_path, "a", tar_with("toc.dat"))) == "tar"
    with pytest.raises(PgOpsError, match=r"is a tar file but not a pg_dump tar-format dump \(no toc\.dat first\)"):
        sniff(write(tmp_path, "b", tar_with("photo.jpg")))


@pytest.mark.parametrize(
    ("data", "msg"),
    [
        (b"", "is empty"),
        (b"\x89PNG\r\n\x1a\n\0\0\0", "is not a PostgreSQL dump"),
        (b"hello world, no sql here", "is not a PostgreSQL dump"),
        (b"SELECT 1;\n\0\0binary", "is not a PostgreSQL dump"),
        (b"\xff\xfe\xe9--\nSET x = 1;\n", "is not a PostgreSQL dump"),  # not text before its first SQL line
        # mtime=0: before Python 3.11 the header holds the current time, and pytest-xdist workers must
        # build identical parameters
        (gzip.compress(b"\0\1\2binary", mtime=0), "is gz-compressed but does not hold plain SQL"),
    ],
)
def test_refuses_what_is_not_a_dump(tmp_path: Path, data: bytes, msg: str):
    with pytest.raises(PgOpsError, match=msg):
        sniff(write(tmp_path, "f", data))


def test_a_plain_dump_in_a_database_encoding_other_than_utf8(tmp_path: Path):
    latin1 = "--\n-- PostgreSQL database dump\n--\nSET client_encoding = 'LATIN1';\nCOPY public.t (n) FROM stdin;\n"
    assert sniff(write(tmp_path, "f", (latin1 + "Müller\n" * 600).encode("latin-1"))) == "plain"


def test_missing_and_empty_directory(tmp_path: Path):
    with pytest.raises(PgOpsError, match=r"dump '.*nope' does not exist"):
        DumpSource(str(tmp_path / "nope"))
    with pytest.raises(PgOpsError, match=r"is a directory without toc\.dat"):
        DumpSource(str(tmp_path))


def test_a_refused_dump_leaves_no_open_file(tmp_path: Path):
    path = write(tmp_path, "f", b"not a dump at all")
    before = len(os.listdir("/proc/self/fd"))
    for _attempt in range(5):
        with pytest.raises(PgOpsError, match="is not a PostgreSQL dump"):
            DumpSource(path)
    assert len(os.listdir("/proc/self/fd")) == before


def test_fingerprint_size_and_close(tmp_path: Path):
    import hashlib

    data = b"PGDMP" + bytes(range(256)) * 5000
    path = write(tmp_path, "x.dump", data)
    with DumpSource(path) as dump:
        assert dump.size == len(data)
        assert dump.fingerprint() == hashlib.sha256(data).hexdigest()
        assert dump.fingerprint() == dump.fingerprint()  # reading does not move anything
        fd = dump.fd
        assert dump.child_path == f"/dev/fd/{fd}"
    assert dump.fd == -1
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


def test_directory_fingerprint_covers_names_and_contents(tmp_path: Path):
    def make(name: str, files: dict) -> str:
        d = tmp_path / name
        d.mkdir()
        for n, content in files.items():
            (d / n).write_bytes(content)
        return str(d)

    a = make("a", {"toc.dat": b"PGDMP", "3001.dat.gz": b"rows"})
    b = make("b", {"3001.dat.gz": b"rows", "toc.dat": b"PGDMP"})  # written in another order
    c = make("c", {"toc.dat": b"PGDMP", "3002.dat.gz": b"rows"})  # same bytes, another name
    d = make("d", {"toc.dat": b"PGDMP", "3001.dat.gz": b"rowz"})
    prints = {}
    for path in (a, b, c, d):
        with DumpSource(path) as dump:
            assert dump.format == "directory" and dump.members() == sorted(os.listdir(path))
            assert dump.size == 9
            prints[path] = dump.fingerprint()
    assert prints[a] == prints[b]
    assert len({prints[a], prints[c], prints[d]}) == 3


def test_unchanged_notices_a_dump_written_meanwhile(tmp_path: Path):
    path = write(tmp_path, "x.sql", PLAIN)
    with DumpSource(path) as dump:
        sha = dump.fingerprint()
        dump.unchanged(sha)
        os.chmod(path, 0o600)  # only the ctime moves: same bytes, not a change
        dump.unchanged(sha)
        with open(path, "ab") as f:
            f.write(b"SELECT 1;\n")
        with pytest.raises(PgOpsError, match="changed while it was being restored"):
            dump.unchanged(sha)


def test_unchanged_notices_same_size_bytes_with_the_mtime_put_back(tmp_path: Path):
    path = write(tmp_path, "x.sql", PLAIN)
    st = os.stat(path)
    with DumpSource(path) as dump:
        sha = dump.fingerprint()
        with open(path, "r+b") as f:
            f.write(PLAIN.replace(b"UTF8", b"LAT1"))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(PgOpsError, match="changed while it was being restored"):
            dump.unchanged(sha)


# --- the plain-SQL filter ------------------------------------------------------------------------


def filtered(sql_text: str, **kw) -> tuple[str, list]:
    flt = PlainFilter(**kw)
    out = b"".join(flt.lines(io.BytesIO(sql_text.encode()))).decode()
    return out, flt.dropped


def test_filter_drops_database_statements_but_not_data_or_comments():
    text = (
        "/*\n   Drop database if it exists\n*/\n"
        "DROP DATABASE IF EXISTS chinook;\n"
        "CREATE DATABASE chinook WITH TEMPLATE = template0;\n"
        "ALTER DATABASE chinook OWNER TO app;\n"
        "\\connect chinook\n"
        "\\c chinook\n"
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
        "\\c chinook",
    ]
    assert "Drop database if it exists" in out and "DROP DATABASE inside copy data;" in out
    assert "\\c not a meta command here" in out and out.endswith("SELECT 1;")
    assert "\\connect" not in out.replace("\\c not a meta command here", "")


def test_filter_refuses_a_multiline_database_statement():
    with pytest.raises(PgOpsError, match=r"multi-line database statement \(CREATE DATABASE x\.\.\.\)"):
        filtered("CREATE DATABASE x\n  TEMPLATE template0;\n")


@pytest.mark.parametrize(
    "line",
    ["\\! touch x", "  \\setenv PAGER 'sh -c id'", "\\o /tmp/out", "\\copy t from program 'id'", "\\i /etc/passwd"],
)
def test_meta_commands_reach_psql_only_behind_our_restrict_key(line: str):
    """psql refuses every meta-command after \\restrict (tests/integration/test_restore.py runs it): the filter
    puts the key first, and takes out the dump's own \\restrict and \\unrestrict so none can lift it."""
    text = f"\\unrestrict guessed\nSET client_encoding = 'UTF8';\n{line}\n\\restrict other\nSELECT 1;\n"
    out = filtered(text, restrict_key="k3y")[0]
    # a left-out line becomes an empty one and our key takes the first line's place: psql numbers lines as the dump
    assert out.splitlines() == ["\\restrict k3y", "SET client_encoding = 'UTF8';", line, "", "SELECT 1;"]


def test_filter_replaces_the_dumps_restrict_with_its_own_key():
    text = "\\restrict Dump0Key\nSET x = 1;\nCOPY t (x) FROM stdin;\n\\\\restrict in data\n\\.\n\\unrestrict Dump0Key\n"
    out, dropped = filtered(text, restrict_key="OurKey123")
    assert out == "\\restrict OurKey123\nSET x = 1;\nCOPY t (x) FROM stdin;\n\\\\restrict in data\n\\.\n\n"
    assert dropped == []  # replaced, not reported as a left-out statement
    out = filtered(text)[0]
    assert "restrict" not in out.replace("\\\\restrict in data", "")


def test_our_key_goes_before_a_first_line_of_sql():
    flt = PlainFilter(restrict_key="k")
    assert b"".join(flt.lines(io.BytesIO(b"SELECT 1;\n"))) == b"\\restrict k\nSELECT 1;\n" and flt.shifted
    flt = PlainFilter(restrict_key="k")
    assert b"".join(flt.lines(io.BytesIO(b"--\nSELECT 1;\n"))) == b"\\restrict k\nSELECT 1;\n" and not flt.shifted


def test_copy_data_lines_starting_with_a_backslash_pass():
    data = ["\\N\t1", "\\\\server\\share\t2", "\\x41\t3", "\\!\t4", "\\connect\t5", "\\restrict k\t6"]
    text = "COPY public.t (a, b) FROM stdin;\n" + "\n".join(data) + "\n\\.\nSELECT 1;\n"
    out, dropped = filtered(text)
    assert out == text and dropped == []


def test_filter_drops_settings_the_server_does_not_know():
    out, dropped = filtered("SET transaction_timeout = 0;\nSET lock_timeout = 0;\n",
                            unknown_settings=("transaction_timeout",))  # fmt: skip
    assert out == "\nSET lock_timeout = 0;\n" and dropped == ["SET transaction_timeout = 0;"]


def test_lines_inside_quoted_text_are_not_meta_commands():
    """psql reads no meta-command inside a dollar-quoted body or a string literal; pg_dump writes such lines."""
    text = (
        "CREATE FUNCTION public.digits(t text) RETURNS text LANGUAGE sql AS $_$\n"
        "SELECT substring(t from '\n"
        "\\d+')\n"
        "$_$;\n"
        "INSERT INTO public.notes VALUES (1, 'first line\n"
        "\\\\server\\share');\n"
    )
    out, dropped = filtered(text)
    assert out == text and dropped == []
