"""How a large table's COPY text is cut into blocks of whole rows, and how a plain dump is shared between psql
sessions and the COPY sessions of its large tables (the sessions themselves are tested on a real server)."""

from __future__ import annotations

import io

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils import parallel
from ansible_collections.pgops.dbrestore.plugins.module_utils.parallel import (
    PlainSplit,
    RowBlocks,
    copy_relation,
    dump_setting,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError


class Pipe(io.RawIOBase):
    """A pipe's reads: at most `step` bytes each, whatever was asked."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.pos = data, step, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.step, len(self.data) - self.pos)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_blocks_hold_whole_rows_and_grow_for_a_row_longer_than_the_buffer(monkeypatch, step):
    monkeypatch.setattr(parallel, "BLOCK", 64)
    long_row = b"x" * 300 + b"\n"
    rows = [b"%d\tvalue\n" % i for i in range(40)] + [long_row] + [b"tail\n"]
    stream = RowBlocks(Pipe(b"SET client_encoding = 'UTF8';\nCOPY t (a) FROM stdin;\n" + b"".join(rows) + b"cut", step))
    assert stream.line() == b"SET client_encoding = 'UTF8';\n"
    assert stream.line() == b"COPY t (a) FROM stdin;\n"
    blocks = list(stream.blocks())
    assert b"".join(blocks) == b"".join(rows)  # the unterminated "cut" is never handed on
    assert all(b.endswith(b"\n") for b in blocks) and any(long_row in b for b in blocks)
    assert stream.line() == b""


def test_the_end_marker_ends_the_rows_and_the_rest_is_read_away(monkeypatch):
    monkeypatch.setattr(parallel, "BLOCK", 32)
    pipe = Pipe(b"a\n\\.x\n" * 10 + b"\\.\n\n--\n-- PostgreSQL database dump complete\n" + b"-" * 500, 5)
    stream = RowBlocks(pipe)
    assert b"".join(parallel._until_end_marker(stream, "t")) == b"a\n\\.x\n" * 10  # "\.x" is a row, not the end
    stream.drain()
    assert pipe.pos == len(pipe.data)


def test_rows_without_their_end_marker_are_an_error():
    with pytest.raises(PgOpsError, match=r"table public\.t ended without its end marker"):
        list(parallel._until_end_marker(RowBlocks(Pipe(b"1\n2\n", 3)), "public.t"))


def test_copy_lines_name_their_table_quoted_or_not():
    assert copy_relation("COPY public.events (id, note) FROM stdin;\n") == ("public", "events")
    assert copy_relation('COPY "odd schema"."Ev""ents" (id) FROM stdin;\n') == ("odd schema", 'Ev"ents')
    assert copy_relation("SELECT 1;\n") is None


def test_setting_lines_as_pg_dump_writes_them():
    assert dump_setting(b"SET client_encoding = 'LATIN1';\n") == ("client_encoding", "LATIN1")
    assert dump_setting(b"SET statement_timeout = 0;\n") == ("statement_timeout", "0")
    assert dump_setting(b"SET default_tablespace = '';\r\n") == ("default_tablespace", "")
    quoted = b"SELECT pg_catalog.set_config('search_path', 'a, ''b''', false);\n"
    assert dump_setting(quoted) == ("search_path", "a, 'b'")
    for other in (b"SET SESSION AUTHORIZATION 'app';\n", b"SET x = 1; DROP TABLE t;\n", b"SELECT 1;\n"):
        assert dump_setting(other) is None


class Copier:
    def __init__(self, loads: list) -> None:
        self.loads = loads

    def spread(self, statement, blocks, what, settings) -> int:
        self.loads.append((what, dict(settings), b"".join(blocks)))
        return 0


DUMP = [
    b"\\restrict KEY\n",
    b"SET client_encoding = 'LATIN1';\n",
    b"SELECT pg_catalog.set_config('search_path', '', false);\n",
    b"SET default_tablespace = '';\n",
    b"CREATE TABLE public.big (id integer, note text);\n",
    b"COPY public.small (k) FROM stdin;\n",
    b"SET default_tablespace = 'rows are data, never settings';\n",
    b"\\.\n",
    b"SET default_tablespace = fast;\n",
    b"COPY public.big (id, note) FROM stdin;\n",
    b"1\tone\n",
    b"2\ttwo\n",
    b"\\.\n",
    b"ALTER TABLE ONLY public.big ADD CONSTRAINT big_pkey PRIMARY KEY (id);\n",
]


def test_a_plain_dump_is_psql_sessions_around_the_large_tables_rows():
    sessions: list[list[bytes]] = []
    loads: list = []
    split = PlainSplit({("public", "big")}, b"\\restrict KEY\n", lambda: Copier(loads))
    assert split.load(iter(DUMP), lambda lines: sessions.append(list(lines))) == ["public.big"]
    assert sessions[0] == DUMP[:9]  # the small table's rows go to psql, its data line is not a setting
    settings = {"client_encoding": "LATIN1", "search_path": "", "default_tablespace": "fast"}
    assert loads == [("public.big", settings, b"1\tone\n2\ttwo\n")]
    # the next session: our key, the dump's settings so far (last value), then the rest
    assert sessions[1] == [DUMP[0], DUMP[1], DUMP[2], DUMP[8], DUMP[13]]
    assert split.offset == 13 - 4  # psql's line 5 is the dump's line 14


def test_a_plain_dump_cut_in_a_large_tables_rows_is_an_error():
    split = PlainSplit({("public", "big")}, b"\\restrict KEY\n", lambda: Copier([]))
    with pytest.raises(PgOpsError, match=r"public\.big ended without its end marker"):
        split.load(iter(DUMP[:11]), list)
