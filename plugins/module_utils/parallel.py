# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Loading a large table with several COPY sessions at once, from the one dump stream.

pg_restore --jobs loads one table per job, so a database dominated by one large table (events,
logs, audit) loads that table on one core. Here an archive is restored in its three sections:
pre-data (pg_restore), then the data -- the large tables' COPY text, read from pg_restore
--data-only -f -, cut into blocks on row boundaries (a COPY text row never holds a raw newline)
and fed round-robin to several COPY sessions, while pg_restore --jobs loads every other table
-- then post-data (indexes, constraints) with pg_restore --jobs. The tools and the sessions get
settings that help a bulk load and concern only them (synchronous_commit off,
maintenance_work_mem sized to the host); nothing is changed for the rest of the server.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import Any

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
_IDENT = re.compile(r'"((?:[^"]|"")*)"|([^\s,"]+)')


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


class SplitCopy:
    """One large table: pg_restore --data-only -t TABLE -f - read once, its rows fed to `parts` COPY sessions."""

    def __init__(self, params: ConnParams, dbname: str, parts: int, settings: dict[str, str]) -> None:
        self.params, self.dbname, self.parts, self.settings = params, dbname, parts, settings
        self.errors: list[BaseException] = []

    def run(self, argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...], schema: str, table: str,
            on_start: Callable[[int], None] | None = None) -> int:  # fmt: skip
        """Load the table; returns the bytes of COPY text loaded."""
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(dies_with_us(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err, env=env, pass_fds=pass_fds)  # fmt: skip
            if on_start is not None:
                on_start(proc.pid)
            try:
                loaded = self._feed(proc.stdout, schema, table)
            finally:
                proc.stdout.close()  # type: ignore[union-attr]
                code = proc.wait()
            err.seek(0)
            message = err.read().decode(errors="replace")
        if self.errors:
            exc = self.errors[0]
            raise PgOpsError(f"loading table {schema}.{table} in parallel failed: {one_line(exc)}",
                             sqlstate=getattr(exc, "sqlstate", None)) from exc  # fmt: skip
        if code != 0:
            raise PgOpsError(f"pg_restore exited with {code} reading table {schema}.{table}: {tail(message)}")
        return loaded

    def _feed(self, stream: Any, schema: str, table: str) -> int:
        for raw in iter(stream.readline, b""):  # SET lines and comments, then the table's COPY line
            if raw.startswith(b"COPY "):
                statement = copy_statement(raw.decode(), schema, table)
                break
        else:
            return 0  # no data for this table in the dump
        queues: list[queue.Queue] = [queue.Queue(maxsize=4) for _part in range(self.parts)]
        workers = [threading.Thread(target=self._session, args=(statement, q), daemon=True) for q in queues]
        for w in workers:
            w.start()
        loaded, turn, pending, done = 0, 0, b"", False
        try:
            while not done and not self.errors:
                block = stream.read(BLOCK)
                if not block:
                    raise PgOpsError(f"the dump's data of table {schema}.{table} ended without its end marker")
                data = pending + block
                cut = data.rfind(b"\n") + 1
                rows, pending = data[:cut], data[cut:]
                end = rows.find(b"\\.\n") if rows.startswith(b"\\.\n") else rows.find(b"\n\\.\n")
                if end >= 0:  # the end marker: a line of its own
                    rows, done = rows[: end + (0 if rows.startswith(b"\\.\n") else 1)], True
                if rows:
                    queues[turn].put(rows)
                    loaded += len(rows)
                    turn = (turn + 1) % self.parts
        finally:
            for q in queues:
                q.put(None)
            for w in workers:
                w.join()
        return loaded

    def _session(self, statement: Any, q: queue.Queue) -> None:
        ended = False  # the reader's None was taken
        try:
            with connect(self.params.with_db(self.dbname)) as conn:
                for name, value in self.settings.items():
                    conn.execute("SELECT pg_catalog.set_config(%s, %s, false)", (name, value))
                with conn.cursor().copy(statement) as copy:
                    while True:
                        rows = q.get()
                        if rows is None:
                            ended = True
                            break
                        if not self.errors:  # else drain: the reader must never block on a full queue
                            copy.write(rows)
        except (psycopg.Error, PgOpsError) as exc:
            self.errors.append(exc)
            while not ended:
                ended = q.get() is None
