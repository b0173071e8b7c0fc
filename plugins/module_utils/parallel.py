# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Loading a large table with several COPY sessions at once, from the one dump stream.

pg_restore --jobs loads one table per job, so a database dominated by one large table (events,
logs, audit) loads that table on one core. Here an archive is restored in its three sections:
pre-data (pg_restore), then the data -- the large tables' COPY text, read from pg_restore
--data-only -f -, cut into blocks on row boundaries (a COPY text row never holds a raw newline)
and fed round-robin to several COPY sessions, while pg_restore --jobs loads every other table
-- then post-data (indexes, constraints) with pg_restore --jobs. A plain dump goes to psql session
after session around its large tables (PlainSplit). The COPY sessions take the dump's settings that
concern them (COPY_SETTINGS); the tools and the sessions get settings that help a bulk load and
concern only them (synchronous_commit off, maintenance_work_mem sized to the host); nothing is
changed for the rest of the server.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.dumpfile import COPY_FROM_STDIN
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    ConnParams,
    PgOpsError,
    connect,
    one_line,
    psycopg,
    sql,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.tools import dies_with_us, tail

BLOCK = 1 << 20  # bytes a COPY session gets at a time (whole rows)
# TABLE DATA line of pg_restore -l: "2657; 0 16390 TABLE DATA public track owner" (names unquoted)
_TABLE_DATA = re.compile(r"^\d+; \d+ \d+ TABLE DATA (.*)$")
_COPY = re.compile(r"^COPY (?P<rel>.+?) \((?P<cols>.*)\) FROM stdin;$")
_REL = re.compile(r'^(?:"((?:[^"]|"")*)"|([^\s."]+))\.(?:"((?:[^"]|"")*)"|([^\s."]+))$')
_IDENT = re.compile(r'"((?:[^"]|"")*)"|([^\s,"]+)')
# a setting line of pg_dump's SQL: "SET client_encoding = 'UTF8';", "SELECT pg_catalog.set_config('search_path', '',
# false);" (name, then the value: quoted, or a bare word or number)
_SETTING = re.compile(
    rb"^(?:SET (\w+) = |SELECT pg_catalog\.set_config\('(\w+)', )('(?:[^']|'')*'|[\w.-]+)(?:, false\))?;\r?\n$"
)
# the dump's settings the COPY sessions take, as pg_restore's and psql's sessions have them: how the rows
# are read (encoding, XML), how long they may take, and what the table's triggers and checks resolve names in
COPY_SETTINGS = ("client_encoding", "xmloption", "statement_timeout", "lock_timeout",
                 "idle_in_transaction_session_timeout", "row_security", "search_path")  # fmt: skip
# what pg_restore sets in each of its sessions before the dump's own settings (its "fixed output state")
PG_RESTORE_FIXED = {"statement_timeout": "0", "lock_timeout": "0", "idle_in_transaction_session_timeout": "0",
                    "xmloption": "content", "row_security": "off"}  # fmt: skip


def dump_setting(line: bytes) -> tuple[str, str] | None:
    """(name, value) of a line of the dump that sets a setting, as pg_dump writes them; None for any other."""
    m = _SETTING.match(line)
    if m is None:
        return None
    value = m.group(3).decode(errors="replace")
    if value.startswith("'"):
        value = value[1:-1].replace("''", "'")
    return (m.group(1) or m.group(2)).decode(), value


def bulk_settings(jobs: int) -> dict[str, str]:
    """Settings of the restore's own sessions: they help a bulk load and concern no other session."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        mem = 1 << 32
    per_job_mb = max(64, min(2048, mem // (8 * max(jobs, 1)) >> 20))  # an eighth of the RAM, shared by the jobs
    return {"synchronous_commit": "off", "maintenance_work_mem": f"{per_job_mb}MB"}


def pgoptions(settings: dict[str, str]) -> str:
    return " ".join(f"-c {k}={v}" for k, v in settings.items())


def large_tables(params: ConnParams, live_db: str, min_bytes: int) -> set[tuple[str, str]]:
    """(schema, table) of the live database's tables of at least min_bytes: the ones worth splitting."""
    with connect(params.with_db(live_db)) as conn:
        rows = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND pg_catalog.pg_relation_size(c.oid) >= %s",
            (min_bytes,),
        ).fetchall()
    return {(r[0], r[1]) for r in rows}


def split_list(toc: str, large: set[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """The TOC list with the large tables' data left out (for pg_restore -L), and those tables."""
    lines, chosen = [], []
    for line in toc.splitlines():
        m = _TABLE_DATA.match(line)
        # names are printed unquoted: a name with spaces is taken only when no other large table fits the line
        fits = [n for n in large if m and m.group(1).startswith(f"{n[0]} {n[1]} ")] if m else []
        if len(fits) == 1 and fits[0] not in chosen:
            chosen.append(fits[0])
            line = ";" + line
        lines.append(line)
    return "\n".join(lines) + "\n", chosen


def copy_statement(line: str, schema: str, table: str) -> Any:
    """Our own COPY … FROM STDIN for the table, with the column list of the dump's COPY line.

    The statement is built from identifiers, never run as the dump wrote it: only rows of this
    table can be loaded.
    """
    m = _COPY.match(line.rstrip("\n"))
    if not m:
        raise PgOpsError(f"unexpected COPY line for table {schema}.{table} in the dump: {line[:80]!r}")
    cols = [q.replace('""', '"') if q or not bare else bare for q, bare in _IDENT.findall(m.group("cols"))]
    return sql.SQL("COPY {}.{} ({}) FROM STDIN").format(
        sql.Identifier(schema), sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, cols))
    )


class RowBlocks:
    """A pipe of COPY text read straight into one buffer and handed on in blocks of whole rows.

    Reading with a buffered read(n) and joining each block's cut-off row onto the next copied every
    byte three more times: 0.9 s of CPU for 490 MB against 0.2 s here, on cores the COPY sessions need.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream  # unbuffered (readinto returns what the pipe holds)
        self.buf = bytearray(BLOCK)
        self.start = self.have = 0  # unread bytes are buf[start:have]

    def _fill(self) -> bool:
        """Read more behind what is unread; False at the end of the stream."""
        if self.start:
            self.buf[: self.have - self.start] = self.buf[self.start : self.have]
            self.have -= self.start
            self.start = 0
        if self.have == len(self.buf):  # one row longer than the buffer (a large bytea)
            self.buf.extend(bytes(len(self.buf)))
        with memoryview(self.buf) as view:
            got = self.stream.readinto(view[self.have :])
        self.have += got or 0
        return bool(got)

    def line(self) -> bytes:
        """The next line with its newline; b"" at the end of the stream."""
        while True:
            end = self.buf.find(b"\n", self.start, self.have) + 1
            if end:
                line, self.start = bytes(self.buf[self.start : end]), end
                return line
            if not self._fill():
                return b""

    def blocks(self) -> Iterator[bytes]:
        """Blocks of whole lines, each once the buffer is nearly full, until the end of the stream."""
        more = True
        while more:
            more = self._fill()
            if more and self.have < len(self.buf) - (len(self.buf) >> 4):
                continue
            end = self.buf.rfind(b"\n", self.start, self.have) + 1
            if end:
                with memoryview(self.buf) as view:
                    block = bytes(view[self.start : end])
                self.start = end
                yield block

    def drain(self) -> None:
        self.start = self.have = 0
        while self._fill():
            self.have = 0


class SplitCopy:
    """One large table's rows fed round-robin to `parts` COPY sessions: read from pg_restore --data-only -t TABLE
    -f - (run), or handed over as blocks of whole rows (spread, for a plain dump)."""

    def __init__(self, params: ConnParams, dbname: str, parts: int, settings: dict[str, str]) -> None:
        self.params, self.dbname, self.parts, self.settings = params, dbname, parts, settings
        self.errors: list[BaseException] = []

    def run(self, argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...], schema: str, table: str,
            on_start: Callable[[int], None] | None = None) -> int:  # fmt: skip
        """Load the table; returns the bytes of COPY text loaded."""
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(dies_with_us(argv), bufsize=0, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err, env=env, pass_fds=pass_fds)  # fmt: skip
            if on_start is not None:
                on_start(proc.pid)
            try:
                loaded = self._from_archive(proc.stdout, f"{schema}.{table}", schema, table)
            finally:
                proc.stdout.close()  # type: ignore[union-attr]
                code = proc.wait()
            err.seek(0)
            message = err.read().decode(errors="replace")
        if code != 0:
            raise PgOpsError(f"pg_restore exited with {code} reading table {schema}.{table}: {tail(message)}")
        return loaded

    def load(self, data: Any, schema: str, table: str) -> int:
        """Load the table from data read out of the archive here (archive.TableData); the bytes of COPY text loaded.

        pg_dump wrote the rows and their end marker, as pg_restore prints them.
        """
        what = f"{schema}.{table}"
        statement = copy_statement(data.copy_line, schema, table)
        return self.spread(statement, _until_end_marker(RowBlocks(data), what), what, data.settings)

    def _from_archive(self, stream: Any, what: str, schema: str, table: str) -> int:
        rows_in = RowBlocks(stream)
        settings: dict[str, str] = {}
        for raw in iter(rows_in.line, b""):  # SET lines and comments, then the table's COPY line
            setting = dump_setting(raw)
            if setting:
                settings[setting[0]] = setting[1]
            if raw.startswith(b"COPY "):
                statement = copy_statement(dump_text(raw, settings.get("client_encoding")), schema, table)
                break
        else:
            return 0  # no data for this table in the dump
        loaded = self.spread(statement, _until_end_marker(rows_in, what), what, settings)
        rows_in.drain()  # the dump's closing comments: pg_restore must not die writing them
        return loaded

    def spread(self, statement: Any, blocks: Iterable[bytes], what: str, dump_settings: dict[str, str]) -> int:
        """Feed the blocks round-robin to the sessions, which take the dump's COPY_SETTINGS; the bytes loaded."""
        queues: list[queue.Queue] = [queue.Queue(maxsize=4) for _part in range(self.parts)]
        settings = {**self.settings, **{k: v for k, v in dump_settings.items() if k in COPY_SETTINGS}}
        workers = [threading.Thread(target=self._session, args=(statement, settings, q), daemon=True) for q in queues]
        for w in workers:
            w.start()
        loaded, turn = 0, 0
        try:
            for rows in blocks:
                if self.errors:
                    break
                queues[turn].put(rows)
                loaded += len(rows)
                turn = (turn + 1) % self.parts
        finally:
            for q in queues:
                q.put(None)
            for w in workers:
                w.join()
        if self.errors:
            exc = self.errors[0]
            raise PgOpsError(f"loading table {what} in parallel failed: {one_line(exc)}",
                             sqlstate=getattr(exc, "sqlstate", None)) from exc  # fmt: skip
        return loaded

    def _session(self, statement: Any, settings: dict[str, str], q: queue.Queue) -> None:
        ended = False  # the reader's None was taken
        try:
            with connect(self.params.with_db(self.dbname)) as conn:
                for name, value in settings.items():
                    conn.execute("SELECT pg_catalog.set_config(%s, %s, false)", (name, value))
                with conn.cursor().copy(statement) as copy:
                    while True:
                        rows = q.get()
                        if rows is None:
                            ended = True
                            break
                        if not self.errors:  # else drain: the reader must never block on a full queue
                            copy.write(memoryview(rows))  # psycopg cuts it into pieces: views, not copies
        except (psycopg.Error, PgOpsError) as exc:
            self.errors.append(exc)
            while not ended:
                ended = q.get() is None


def _until_end_marker(rows_in: RowBlocks, what: str) -> Iterator[bytes]:
    """The blocks of one table's COPY text up to its end marker, a line of its own."""
    for rows in rows_in.blocks():
        marker = 0 if rows.startswith(b"\\.\n") else rows.find(b"\n\\.\n") + 1 or None  # where its line starts
        if marker is None:
            yield rows
            continue
        if marker:
            yield rows[:marker]
        return
    raise PgOpsError(f"the dump's data of table {what} ended without its end marker")


def dump_text(raw: bytes, encoding: str | None) -> str:
    """A line of the dump as text, for the names in it: pg_dump writes the database's encoding (LATIN1, WIN1252…)."""
    try:
        return raw.decode((encoding or "UTF8").lower().replace("win", "cp"))
    except (LookupError, UnicodeDecodeError):  # an encoding Python names otherwise: names stay ASCII-safe
        return raw.decode("utf-8", errors="replace")


def copy_relation(line: str) -> tuple[str, str] | None:
    """(schema, table) of a pg_dump COPY … FROM stdin line; None for any other line."""
    m = _COPY.match(line.rstrip("\r\n"))
    rel = _REL.match(m.group("rel")) if m else None
    if rel is None:
        return None
    schema, table = (q.replace('""', '"') if q is not None else bare for q, bare in (rel.group(1, 2), rel.group(3, 4)))
    return schema, table


class PlainSplit:
    """A plain dump fed to psql session after session, the rows of its large tables to several COPY sessions.

    psql runs the dump in one transaction. A large table's COPY line ends that session: psql commits,
    so the table is there for the COPY sessions, which load its rows. The next psql session gets our
    \\restrict key, the dump's settings so far (SET lines, search_path), then the rest of the dump.
    """

    def __init__(self, split: Collection[tuple[str, str]], restrict_line: bytes,
                 copier: Callable[[], SplitCopy]) -> None:  # fmt: skip
        self.split, self.restrict_line, self.copier = split, restrict_line, copier
        self.lines: dict[str, bytes] = {}  # setting: the dump's last line setting it
        self.settings: dict[str, str] = {}  # setting: its value there
        self.lines_read = 0  # of the dump, so far
        self.offset = 0  # the current psql session's line N is the dump's line N + offset
        self.loaded: list[str] = []

    def load(self, lines: Iterator[bytes], run_psql: Callable[[Iterator[bytes]], None]) -> list[str]:
        """Run every psql session and split load; the large tables loaded split, as "schema.table"."""
        first = True
        while True:
            stop: list[tuple[tuple[str, str], str]] = []
            run_psql(self._session_lines(lines, first, stop))
            if not stop:
                return self.loaded
            (schema, table), copy_line = stop[0]
            what = f"{schema}.{table}"
            self.copier().spread(copy_statement(copy_line, schema, table), self._rows(lines, what), what, self.settings)
            self.loaded.append(what)
            first = False

    def _session_lines(self, lines: Iterator[bytes], first: bool, stop: list) -> Iterator[bytes]:
        """One psql session's lines: up to the COPY line of a large table (put in stop), or to the dump's end."""
        if not first:
            head = [self.restrict_line, *self.lines.values()]
            self.offset = self.lines_read - len(head)
            yield from head
        in_copy = False
        for line in lines:
            self.lines_read += 1
            if in_copy:
                in_copy = line.rstrip(b"\r\n") != b"\\."
            elif line[:1] in b"SCc \t":  # a setting or a COPY: nothing else is looked at
                text = dump_text(line, self.settings.get("client_encoding"))
                in_copy = bool(COPY_FROM_STDIN.match(text))
                table = copy_relation(text) if in_copy else None
                if table in self.split:
                    stop.append((table, text))
                    return
                setting = dump_setting(line)
                if setting:
                    self.lines[setting[0]], self.settings[setting[0]] = line, setting[1]
            yield line

    def _rows(self, lines: Iterator[bytes], what: str) -> Iterator[bytes]:
        """The table's rows in blocks of about BLOCK bytes, up to its end marker."""
        batch: list[bytes] = []
        size = 0
        for line in lines:
            self.lines_read += 1
            if line.rstrip(b"\r\n") == b"\\.":
                break
            batch.append(line)
            size += len(line)
            if size >= BLOCK:
                yield b"".join(batch)
                batch, size = [], 0
        else:
            raise PgOpsError(f"the dump's data of table {what} ended without its end marker")
        if batch:
            yield b"".join(batch)
