# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A source database instead of a dump file: pg_dump of it streamed into the staging copy, no file between.

Every pg_dump session starts with default_transaction_read_only on and reads one snapshot. With
jobs > 1 the load runs in parallel on a snapshot exported by our own REPEATABLE READ, READ ONLY
transaction on the source: the schema as a small custom archive (pre-data restored first,
post-data -- indexes, constraints -- last by pg_restore --jobs, which needs a file), and between
them `jobs` streams of `pg_dump --section=data | pg_restore`, each with a share of the tables
balanced by size, and a large table (split_bytes, sources of 14+) by `jobs` psql pairs, a range
of its pages each (SplitTables). Otherwise, and with tool_args (they may select tables), the plain SQL of one
pg_dump goes through the same filter as a plain dump file (our \\restrict key, statements on
other databases left out) into psql --single-transaction. Either way a source that dies
midway, or a killed run, leaves only the staging copy, which is dropped.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.dumpfile import PlainFilter
from ansible_collections.pgops.dbrestore.plugins.module_utils.load import (
    LoadOptions,
    ViewSampler,
    conninfo_for,
    psql_argv,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.operation import pause_point
from ansible_collections.pgops.dbrestore.plugins.module_utils.parallel import bulk_settings, pgoptions
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    ConnParams,
    PgOpsError,
    ServerInfo,
    connect,
    psycopg,
    server_info,
    sql,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.progress import USER_TABLES, Progress, source_totals
from ansible_collections.pgops.dbrestore.plugins.module_utils.tools import (
    PipeSpec,
    ToolOutput,
    find_tool,
    run_pipes,
    run_tool,
    tool_version,
)

# SET lines pg_dump writes that an older target server may not know; left out when it does not
_NEWER_SETTINGS = ("transaction_timeout", "default_table_access_method", "idle_in_transaction_session_timeout",
                   "row_security", "default_toast_compression")  # fmt: skip
# the source's tables, largest first (heap and TOAST): what the data streams share out, with the heap's pages
_TABLES = (
    "SELECT n.nspname, c.relname, COALESCE(pg_catalog.pg_table_size(c.oid), 0), c.oid, "
    "COALESCE(pg_catalog.pg_relation_size(c.oid), 0) / pg_catalog.current_setting('block_size')::int "
    + USER_TABLES
    + " ORDER BY 3 DESC, 1, 2 LIMIT %s"
)
# the columns COPY can fill, in order (generated ones are computed by the target)
_COLUMNS = (
    "SELECT attname FROM pg_catalog.pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
    "AND attgenerated = '' ORDER BY attnum"
)
# what the two psql sessions of a split table agree on, as pg_dump sets it for its COPY text
_COPY_TEXT = {"datestyle": "ISO", "intervalstyle": "postgres", "extra_float_digits": "3"}
# tables named on the pg_dump command lines at most (an argv has a size limit); smaller ones go to the first stream
_NAMED_TABLES = 1000


def source_params(source: dict[str, Any]) -> ConnParams:
    """The source's connection (pg_restore_db's source suboptions) as ConnParams."""
    if not source.get("db"):
        raise PgOpsError("source needs db, the name of the database to read")
    # the suboptions are the connection options without their login_ prefix
    login = ("user", "password", "host", "unix_socket", "port", "db")
    return ConnParams.from_params({f"login_{k}" if k in login else k: v for k, v in source.items()})


@dataclass
class ServerSource:
    """What the staging step needs of a source: a name for the log and record, and a load into a database."""

    params: ConnParams
    format: str = "server"
    size: int = 0
    info: ServerInfo | None = None
    streams: int = 1  # filled in by load_into: the pg_dump | pg_restore streams the data went through

    @property
    def path(self) -> str:
        """Where it is read from, for messages and the record (never the password)."""
        return self.params.describe()

    def unchanged(self, _sha256: str) -> None:
        """A stream has no file that could change under us."""

    def problems(self, bindir: str | None) -> list[str]:
        """Reachable, readable, a pg_dump new enough for its server, and a psql (check mode runs this too)."""
        try:
            with connect(self.params) as conn:
                self.info = server_info(conn)
        except PgOpsError as exc:
            return [f"the source database cannot be read: {exc}; check source (host, port, user, password, db)"]
        try:
            pg_dump = find_tool("pg_dump", bindir)
            psql_argv(bindir, self.params.login_db, ())  # the psql that loads the stream: found, with \restrict
        except PgOpsError as exc:
            return [str(exc)]
        mine, theirs = tool_version(pg_dump)[0], self.info.version_num // 10000
        if mine < theirs:
            return [f"{pg_dump} ({mine}) cannot dump the source server ({self.info.version}): install the PostgreSQL "
                    f"{theirs}+ client tools and set bindir to their directory"]  # fmt: skip
        return []

    def load_into(self, target: ConnParams, target_conn: Any, dbname: str, opts: LoadOptions,
                  progress: Progress | None = None) -> list[str]:  # fmt: skip
        """pg_dump of the source loaded into dbname, in parallel where it can be; returns the statements left out.

        With progress: the source's tables, bytes and indexes are the totals. A parallel load is counted
        from the staging copy (what is loaded, as another session sees it), a plain stream as it goes to psql.
        """
        version = target_conn.info.server_version
        sampler = ViewSampler(target, version, dbname) if progress is not None and version >= 120000 else None
        if progress is not None:
            progress.sampler = sampler
        try:
            if self.in_parallel(opts.jobs, opts.tool_args, opts.bindir, version):
                try:
                    self._load_parallel(target, dbname, opts, find_tool("pg_restore", opts.bindir), progress, sampler)
                except PgOpsError as exc:
                    raise PgOpsError(f"streaming {self.path} failed: {exc}", sqlstate=exc.sqlstate) from exc
                return []
            return self._load_plain(target, target_conn, dbname, opts, progress)
        finally:
            if sampler is not None:
                sampler.close()

    def in_parallel(self, jobs: int, tool_args: tuple[str, ...], bindir: str | None, target_version: int) -> bool:
        """Parallel pg_dump | pg_restore streams, else one pg_dump | psql: more than one job, no tool_args, a
        source of 10+, and a pg_restore the target understands (17+ sends SET transaction_timeout, which servers
        before 17 reject, see load.restore_into)."""
        if jobs < 2 or tool_args or self.info is None or self.info.version_num < 100000:
            return False
        return target_version >= 170000 or tool_version(find_tool("pg_restore", bindir))[0] < 17

    def splits_tables(self) -> bool:
        """Parallel streams read a large table by page ranges: TID range scans are there from 14 on."""
        return self.info is not None and self.info.version_num >= 140000

    def _load_parallel(self, target: ConnParams, dbname: str, opts: LoadOptions, pg_restore: str,
                       progress: Progress | None, sampler: ViewSampler | None) -> None:  # fmt: skip
        """Schema archive, pre-data, `jobs` data streams on one exported snapshot, post-data with --jobs."""
        src_env = {**self.params.tool_env(), "PGOPTIONS": "-c default_transaction_read_only=on"}
        dst_env = {**target.tool_env(), "PGOPTIONS": pgoptions(bulk_settings(opts.jobs))}
        restore = [pg_restore, "--exit-on-error", "--no-password", "-d", conninfo_for(dbname)]
        with tempfile.TemporaryDirectory(prefix="pgops-schema-") as tmp:
            schema = os.path.join(tmp, "schema.pgc")
            with connect(self.params, autocommit=False) as conn:
                conn.isolation_level, conn.read_only = psycopg.IsolationLevel.REPEATABLE_READ, True
                snapshot = conn.execute("SELECT pg_catalog.pg_export_snapshot()").fetchone()[0]
                rows = conn.execute(_TABLES, (_NAMED_TABLES,)).fetchall()
                if progress is not None:
                    tables, size, indexes = source_totals(conn)
                    progress.totals(tables, indexes, size)
                    progress.counter = sampler.counts if sampler is not None else None
                dump = [find_tool("pg_dump", opts.bindir), "--no-password", "--format=custom", "--compress=0",
                        f"--snapshot={snapshot}", "-d", conninfo_for(self.params.login_db)]  # fmt: skip
                run_tool([*dump, "--section=pre-data", "--section=post-data", "-f", schema], src_env)
                run_tool([*restore, "--section=pre-data", "--single-transaction", schema], dst_env)
                # TID range scans (14+) let each COPY session read only its pages of a large table
                large = [r for r in rows if opts.split_bytes and r[2] >= opts.split_bytes and r[4] >= opts.jobs
                         and self.info.version_num >= 140000]  # type: ignore[union-attr]  # fmt: skip
                split = SplitTables(conn, snapshot, large, opts.jobs, find_tool("psql", opts.bindir))
                pipes = split.pipes(src_env, self.params.login_db, dst_env, dbname)
                shares = share_tables([r[:3] for r in rows if r not in large], opts.jobs)
                others = [f"--exclude-table-data={table_pattern(*t)}" for share in shares[1:] for t in share]
                others += [f"--exclude-table-data={table_pattern(r[0], r[1])}" for r in large]
                selections = [others] + [[f"--table={table_pattern(*t)}" for t in share] for share in shares[1:]]
                self.streams = len(selections)
                pipes += [([*dump, "--section=data", *sel], src_env, restore, dst_env) for sel in selections]
                run_pipes(pipes, between=lambda: pause_point("streaming"))
                opts.split_loaded.extend(f"{r[0]}.{r[1]}" for r in large)
            run_tool([*restore, "--section=post-data", f"--jobs={opts.jobs}", schema], dst_env)
        if progress is not None:
            progress.loaded()

    def _load_plain(self, target: ConnParams, target_conn: Any, dbname: str, opts: LoadOptions,
                    progress: Progress | None) -> list[str]:  # fmt: skip
        """pg_dump's plain SQL piped through our filter into psql on dbname; returns the statements left out."""
        known = {r[0] for r in target_conn.execute("SELECT name FROM pg_catalog.pg_settings").fetchall()}
        flt = PlainFilter(unknown_settings=tuple(s for s in _NEWER_SETTINGS if s not in known),
                          restrict_key=secrets.token_hex(16))  # fmt: skip
        env = self.params.tool_env()
        env["PGOPTIONS"] = "-c default_transaction_read_only=on"
        argv = [find_tool("pg_dump", opts.bindir), "--format=plain", "--no-password", *opts.tool_args,
                "-d", conninfo_for(self.params.login_db)]  # fmt: skip
        psql = psql_argv(opts.bindir, dbname, ())
        if progress is not None:  # counted as it goes to psql (its one transaction hides the tables meanwhile)
            with connect(self.params) as conn:
                tables, _size, indexes = source_totals(conn)
            progress.totals(tables, indexes, None)
            flt.watch = progress.plain_chunk
        with ToolOutput(argv, env) as out:
            try:
                run_tool(psql, target.tool_env(), feed=_pausing(flt.lines(out)))
            except PgOpsError as exc:
                raise PgOpsError(f"streaming {self.path} failed: {exc}", sqlstate=exc.sqlstate) from exc
        if progress is not None:
            progress.loaded()
        return flt.dropped


class SplitTables:
    """Each large table by `parts` pairs of psql at once, each pair copying one range of its pages.

    The reading psql joins the exported snapshot and runs COPY (SELECT … WHERE ctid in its range)
    TO STDOUT; the writing one COPY … FROM STDIN on the staging copy; an OS pipe joins them. The
    last range is open-ended, so no page is missed. Both ends use the source database's encoding
    and pg_dump's date and float settings; the reader runs with row_security off, as pg_dump.
    """

    def __init__(self, conn: Any, snapshot: str, large: list[tuple[Any, ...]], parts: int, psql: str) -> None:
        self.conn, self.snapshot, self.large, self.parts, self.psql = conn, snapshot, large, parts, psql
        self.encoding = conn.execute("SELECT pg_catalog.current_setting('server_encoding')").fetchone()[0]

    def pipes(self, src_env: dict[str, str], source_db: str, dst_env: dict[str, str], target_db: str) -> list[PipeSpec]:
        read_env = {**src_env, "PGCLIENTENCODING": self.encoding,
                    "PGOPTIONS": f"{src_env['PGOPTIONS']} -c row_security=off {pgoptions(_COPY_TEXT)}"}  # fmt: skip
        write_env = {**dst_env, "PGCLIENTENCODING": self.encoding,
                     "PGOPTIONS": f"{dst_env['PGOPTIONS']} {pgoptions(_COPY_TEXT)}"}  # fmt: skip
        base = [self.psql, "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1", "-d"]
        begin = [
            "-c",
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            "-c",
            sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot)).as_string(self.conn),
        ]
        pipes = []
        for schema, table, _size, oid, pages in self.large:
            cols = sql.SQL(", ").join(sql.Identifier(r[0]) for r in self.conn.execute(_COLUMNS, (oid,)).fetchall())
            name = sql.Identifier(schema, table)
            write = sql.SQL("COPY {} ({}) FROM STDIN").format(name, cols).as_string(self.conn)
            bounds = [pages * k // self.parts for k in range(self.parts)]
            for n, first in enumerate(bounds):
                where = sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({first},0)"))
                if n + 1 < len(bounds):
                    where += sql.SQL(" AND ctid < {}::tid").format(sql.Literal(f"({bounds[n + 1]},0)"))
                read = sql.SQL("COPY (SELECT {} FROM ONLY {} WHERE {}) TO STDOUT").format(cols, name, where)
                pipes.append(([*base, conninfo_for(source_db), *begin, "-c", read.as_string(self.conn)],
                              read_env, [*base, conninfo_for(target_db), "-c", write], write_env))  # fmt: skip
        return pipes


def share_tables(tables: list[tuple[str, str, int]], jobs: int) -> list[list[tuple[str, str]]]:
    """The tables (schema, name, bytes; largest first) in `jobs` shares of about equal bytes, empty ones left out.

    The first share also holds whatever is not named: the tables past the list, sequences, large objects.
    """
    shares: list[list[tuple[str, str]]] = [[] for _n in range(jobs)]
    sizes = [0] * jobs
    for schema, table, size in tables:
        n = sizes.index(min(sizes))
        shares[n].append((schema, table))
        sizes[n] += max(size, 1)
    return [shares[0]] + [s for s in shares[1:] if s]


def table_pattern(schema: str, table: str) -> str:
    """A pg_dump pattern matching exactly this table: double quotes make every character literal."""
    return ".".join('"' + name.replace('"', '""') + '"' for name in (schema, table))


def _pausing(lines: Iterator[bytes]) -> Iterator[bytes]:
    """The lines, with the test-only pause point "streaming" once the first ones are on their way."""
    for n, line in enumerate(lines):
        yield line
        if n == 100:
            pause_point("streaming")
