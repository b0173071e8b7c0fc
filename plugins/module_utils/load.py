# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading a dump through, loading it into a database, and verifying the result as its owner."""

from __future__ import annotations

import itertools
import os
import secrets
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.archive import Archive, NotReadableHere
from ansible_collections.pgops.dbrestore.plugins.module_utils.dumpfile import DumpSource, PlainFilter, _FdReader
from ansible_collections.pgops.dbrestore.plugins.module_utils.parallel import (
    PlainSplit,
    SplitCopy,
    bulk_settings,
    pgoptions,
    split_list,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    ConnParams,
    PgOpsError,
    ServerInfo,
    connect,
    execute,
    ident,
    one_line,
    psycopg,
    sql,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.progress import (
    Progress,
    is_info,
    list_totals,
    read_bytes,
    server_views,
    staged_counts,
    toc_totals,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.tools import (
    ToolOutput,
    find_tool,
    has_restrict,
    in_threads,
    run_tool,
    tool_version,
)


@dataclass(frozen=True)
class LoadOptions:
    """How to run the client tools: where they are, how many jobs, extra arguments."""

    bindir: str | None = None
    jobs: int = 1
    tool_args: tuple[str, ...] = ()
    # (schema, table) of the tables to load by `jobs` COPY sessions at once (parallel.py); empty: none
    split: frozenset[tuple[str, str]] = frozenset()
    split_bytes: int = 0  # a source's tables of at least this size are loaded by `jobs` COPY sessions each (stream.py)
    split_loaded: list[str] = field(default_factory=list)  # filled in: the tables that were loaded split
    split_read_here: list[str] = field(default_factory=list)  # of those, the ones read out of the archive here

    def split_read_how(self) -> str:
        """How the split tables' rows were read, for the log: out of the archive here, or through pg_restore."""
        if not self.split_read_here:
            return ""  # a plain dump's, or pg_restore's (lz4/zstd, data without offsets)
        if self.split_read_here == self.split_loaded:
            return ", read from the archive here"
        return f", {', '.join(self.split_read_here)} read from the archive here"


def conninfo_for(dbname: str) -> str:
    """-d value naming only the database: a name with "=" must never be read as a connection string."""
    return psycopg.conninfo.make_conninfo(dbname=dbname)


def check_readable(dump: DumpSource, bindir: str | None, full: bool) -> list[str]:
    """pg_restore -l (TOC) or, with full, a complete read of the dump; plain dumps are read through."""
    if dump.format == "tar":  # always: pg_restore would hang on a truncated one, even while loading
        dump.read_tar_through()
    if dump.is_archive:
        # the TOC listing is kept (dump.toc): the progress totals and the split read it, not the archive again
        with tempfile.NamedTemporaryFile("rb", suffix=".toc") as listing:
            argv = [find_tool("pg_restore", bindir), "-f", os.devnull if full else listing.name]
            argv += [] if full else ["-l"]
            try:
                run_tool([*argv, dump.child_path], dict(os.environ), pass_fds=(dump.fd,))
            except PgOpsError as exc:
                raise PgOpsError(f"dump {dump.path!r} is not readable ({dump.format} format): {exc}") from exc
            if not full:
                dump.toc = listing.read().decode(errors="replace")
        return []
    flt = PlainFilter()
    with dump.plain_stream() as stream:
        gen = flt.lines(stream)
        for _line in gen if full else itertools.islice(gen, 2000):
            pass
    return flt.dropped


def psql_argv(bindir: str | None, dbname: str, tool_args: tuple[str, ...]) -> list[str]:
    psql = find_tool("psql", bindir)
    version = tool_version(psql)
    if not has_restrict(version):
        raise PgOpsError(
            f"{psql} ({version[0]}.{version[1]}) has no \\restrict, so it would run psql meta-commands (\\! runs a "
            "shell command) found in a plain dump: set bindir to a newer client (17.6, 16.10, 15.14, 14.19, 13.22 "
            "or later)"
        )
    return [psql, "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1", "--single-transaction",
            "-d", conninfo_for(dbname), *tool_args, "-f", "-"]  # fmt: skip


def restore_into(
    params: ConnParams,
    info: ServerInfo,
    dbname: str,
    dump: DumpSource,
    opts: LoadOptions,
    progress: Progress | None = None,
) -> list[str]:
    """Load the dump into dbname with pg_restore --exit-on-error or psql ON_ERROR_STOP (one transaction).

    Returns the statements of a plain dump that were left out. pg_restore 17+ sends SET
    transaction_timeout, which servers before 17 reject: against those, the archive is turned
    into SQL (pg_restore -f -) and fed to psql without that line. With progress, what is done
    is counted as it happens (see progress.py).
    """
    # the tools' own sessions only: settings that help a bulk load (see parallel.bulk_settings)
    env = {**params.tool_env(), "PGOPTIONS": pgoptions(bulk_settings(opts.jobs))}
    old_server = info.version_num < 170000
    flt = PlainFilter(unknown_settings=("transaction_timeout",) if old_server else (),
                      restrict_key=secrets.token_hex(16))  # fmt: skip
    fds = (dump.fd,)
    views = (
        ViewSampler(params, info.version_num, dbname) if progress is not None and info.version_num >= 120000 else None
    )
    if progress is not None:
        progress.sampler = views
    try:
        if dump.is_archive:
            pg_restore = find_tool("pg_restore", opts.bindir)
            if progress is not None:
                tables, indexes = (toc_totals(dump.toc) if dump.toc is not None
                                   else list_totals([pg_restore, "-l", dump.child_path], env, fds))  # fmt: skip
                progress.totals(tables, indexes, dump.size)
            split_ok = opts.split and opts.jobs > 1 and not opts.tool_args
            if split_ok and not (old_server and tool_version(pg_restore)[0] >= 17):
                loaded = _restore_split(params, dbname, dump, opts, pg_restore, env, progress)
                if loaded is not None:
                    return loaded
            if not (old_server and tool_version(pg_restore)[0] >= 17):
                argv = [pg_restore, "--exit-on-error", "--no-password", "-d", conninfo_for(dbname)]
                if dump.format != "tar" and opts.jobs > 1:  # tar archives cannot be restored in parallel
                    argv.append(f"--jobs={opts.jobs}")
                if progress is None:
                    run_tool([*argv, *opts.tool_args, dump.child_path], env, pass_fds=fds)
                    return []
                progress.parallel = any(a.startswith("--jobs=") for a in argv)
                run_tool([*argv, "--verbose", *opts.tool_args, dump.child_path], {**env, "LC_MESSAGES": "C"},
                         pass_fds=fds, on_start=progress.reader_pids.append,
                         on_line=progress.tool_line, is_info=is_info)  # fmt: skip
                progress.loaded()
                return []
            psql = psql_argv(opts.bindir, dbname, ())
            with ToolOutput([pg_restore, "-f", "-", *opts.tool_args, dump.child_path], env, pass_fds=fds) as sql_out:
                if progress is not None:
                    progress.reader_pids.append(sql_out.proc.pid)
                    flt.watch = progress.plain_chunk
                run_tool(psql, env, feed=flt.lines(sql_out))
            if progress is not None:
                progress.loaded()
            return flt.dropped
        psql = psql_argv(opts.bindir, dbname, opts.tool_args)
        # a large table's rows go to several COPY sessions, the rest to psql sessions around them (PlainSplit)
        plain_split = PlainSplit(opts.split, flt.restrict_line,
                                 lambda: SplitCopy(params, dbname, opts.jobs, bulk_settings(opts.jobs)))  # fmt: skip
        with dump.plain_stream() as stream:
            if progress is not None:
                progress.totals(None, None, dump.size)
                progress.own_read = _position(stream)
                flt.watch = progress.plain_chunk
            try:
                if opts.split and opts.jobs > 1 and not opts.tool_args:
                    opts.split_loaded.extend(
                        plain_split.load(flt.lines(stream), lambda sql_part: run_tool(psql, env, feed=sql_part))
                    )
                else:
                    run_tool(psql, env, feed=flt.lines(stream))
            except PgOpsError as exc:
                offset = plain_split.offset - int(flt.shifted)
                if not offset:
                    raise
                raise PgOpsError(f"{exc} (psql's line N is line N{offset:+d} of the dump: psql got our \\restrict line "
                                 "and the dump's settings first)", sqlstate=exc.sqlstate) from exc  # fmt: skip
        if progress is not None:
            progress.loaded()
        return flt.dropped
    finally:
        if views is not None:
            views.close()


def _restore_split(
    params: ConnParams,
    dbname: str,
    dump: DumpSource,
    opts: LoadOptions,
    pg_restore: str,
    env: dict[str, str],
    progress: Progress | None,
) -> list[str] | None:
    """pre-data; the large tables by several COPY sessions each while pg_restore --jobs loads the rest; post-data.

    None when none of opts.split is in the dump (the caller restores it as usual). A tar archive cannot be
    restored with --jobs: there the rest and post-data run on one job, the large tables still split.
    """
    fds = (dump.fd,)
    jobs = [f"--jobs={opts.jobs}"] if dump.format != "tar" else []
    toc = dump.toc
    if toc is None:
        try:
            toc = subprocess.run([pg_restore, "-l", dump.child_path], env=env, pass_fds=fds, capture_output=True,
                                 check=True).stdout.decode(errors="replace")  # fmt: skip
        except (OSError, subprocess.CalledProcessError) as exc:
            raise PgOpsError(f"pg_restore -l of {dump.path!r} failed: {exc}") from exc
    listing, chosen = split_list(toc, set(opts.split))
    if not chosen:
        return None
    settings = bulk_settings(opts.jobs)
    base = [pg_restore, "--exit-on-error", "--no-password", "-d", conninfo_for(dbname)]
    watch: dict[str, Any] = {}
    if progress is not None:
        base.append("--verbose")
        env["LC_MESSAGES"] = "C"
        progress.parallel = True
        watch = {"on_start": progress.reader_pids.append, "on_line": progress.tool_line, "is_info": is_info}
    with tempfile.NamedTemporaryFile("w", suffix=".list") as list_file:
        list_file.write(listing)
        list_file.flush()
        run_tool([*base, "--section=pre-data", dump.child_path], env, pass_fds=fds, **watch)
        rest_failed: list[BaseException] = []

        def rest() -> None:
            try:
                run_tool([*base, "--section=data", *jobs, "-L", list_file.name, dump.child_path],
                         env, pass_fds=fds, **watch)  # fmt: skip
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
                rest_failed.append(exc)

        others = threading.Thread(target=rest, name="pgops-restore-data", daemon=True)
        others.start()
        archive, read_here = _archive(dump), []
        if progress is not None:
            progress.own_read = lambda: sum(data.read for data in read_here)
        try:
            for schema, table in chosen:
                split = SplitCopy(params, dbname, opts.jobs, settings)
                data = archive.table_data(schema, table) if archive is not None else None
                if data is not None:
                    read_here.append(data)
                    try:
                        split.load(data, schema, table)
                    finally:
                        data.close()
                    opts.split_read_here.append(f"{schema}.{table}")
                else:
                    argv = [pg_restore, "--data-only", "-n", schema, "-t", table, "-f", "-", dump.child_path]
                    split.run(argv, env, fds, schema, table, on_start=watch.get("on_start"))
                opts.split_loaded.append(f"{schema}.{table}")
                if progress is not None:
                    progress.table_loaded()
        finally:
            others.join()
        if rest_failed:
            raise rest_failed[0]
        run_tool([*base, "--section=post-data", *jobs, dump.child_path], env, pass_fds=fds, **watch)
    if progress is not None:
        progress.loaded()
    return []


def _archive(dump: DumpSource) -> Archive | None:
    """The archive's TOC, for reading large tables here; None when pg_restore must read them."""
    if dump.format not in ("custom", "directory"):
        return None
    try:
        return Archive(dump.fd, directory=dump.is_dir)
    except (NotReadableHere, OSError):
        return None


def _position(stream: Any) -> Callable[[], int] | None:
    """How many bytes of the dump file a plain stream has read so far."""
    if isinstance(stream, _FdReader):
        return lambda: stream.offset
    inner = getattr(stream, "fileobj", None)  # gzip.GzipFile
    if isinstance(inner, _FdReader):
        return lambda: inner.offset
    proc = getattr(stream, "proc", None)  # a decompressor reading the file
    if proc is not None:
        return lambda: read_bytes([proc.pid])
    return None


class ViewSampler:
    """The server's progress views for one database, on a connection of its own (the progress thread's)."""

    def __init__(self, params: ConnParams, version_num: int, dbname: str) -> None:
        self.params, self.version_num, self.dbname = params, version_num, dbname
        self.conn: Any = None

    def _conn(self) -> Any:
        if self.conn is None or self.conn.closed:
            self.conn = connect(self.params.with_db(self.dbname))  # names of its tables resolve there
        return self.conn

    def __call__(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return server_views(self._conn(), self.version_num, self.dbname)

    def counts(self) -> tuple[int, int, int]:
        """What is loaded so far (Progress.counter, when no tool reports it)."""
        return staged_counts(self._conn(), self.version_num, self.dbname)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def verify(params: ConnParams, dbname: str, verify_query: str | None, owner: str, analyze: bool, jobs: int = 1) -> None:
    """Run verify_query on the restored copy with its owner's rights (it may call the app's functions)."""
    with connect(params.with_db(dbname)) as conn:
        if verify_query:
            _verify_query(conn, verify_query, owner)
        if analyze:
            analyze_tables(params, dbname, conn, jobs)


# the app's tables, materialized views (populated) and partitioned tables (whose ANALYZE samples and analyzes
# their partitions), largest first; not the system catalogs, which the restore hardly changes
_ANALYZED = (
    "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'm', 'p') AND (c.relkind <> 'm' OR c.relispopulated) AND c.relpersistence <> 't' "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast' {partitions}"
    "ORDER BY pg_catalog.pg_relation_size(c.oid) DESC"
)


def analyze_tables(params: ConnParams, dbname: str, conn: Any, jobs: int) -> None:
    """ANALYZE the restored copy's tables over up to `jobs` sessions at once (as vacuumdb --analyze-only --jobs).

    Index expressions run as each table's owner, in a security-restricted operation, as in a database-wide ANALYZE;
    a table the login role may not analyze is skipped with a warning there as here.
    """
    partitions = "AND NOT c.relispartition " if conn.info.server_version >= 100000 else ""
    tables = [sql.Identifier(r[0], r[1]) for r in conn.execute(_ANALYZED.format(partitions=partitions)).fetchall()]
    if jobs <= 1 or len(tables) <= 1:
        for table in tables:
            execute(conn, sql.SQL("ANALYZE {}").format(table), "ANALYZE of the restored copy failed")
        return
    todo, lock, failed = iter(tables), threading.Lock(), []  # type: ignore[var-annotated]

    def worker(session: Any) -> None:
        while not failed:
            with lock:
                table = next(todo, None)
            if table is None:
                return
            try:
                execute(session, sql.SQL("ANALYZE {}").format(table), "ANALYZE of the restored copy failed")
            except PgOpsError as exc:
                failed.append(exc)

    sessions = [conn] + [connect(params.with_db(dbname)) for _n in range(min(jobs, len(tables)) - 1)]
    try:
        in_threads(worker, sessions, "pgops-analyze")
    finally:
        for session in sessions[1:]:
            session.close()
    if failed:
        raise failed[0]


def _verify_query(conn: Any, query: str, owner: str) -> None:
    """A superuser cannot drop its rights in a session (RESET ROLE undoes SET ROLE), so when the owner is
    not one, the query becomes a materialized view owned by the owner and REFRESH runs it: PostgreSQL
    runs that as the owner in a security-restricted operation, where no role change is possible.
    Names are bound when the view is made, with PostgreSQL's default search_path ("$user", public).
    """
    row = conn.execute(
        "SELECT r.rolsuper, (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) "
        "FROM pg_catalog.pg_roles r WHERE r.rolname = %s",
        (owner,),
    ).fetchone()
    as_owner = bool(row) and not row[0] and bool(row[1])
    schema = ident(f"pgops_verify_{secrets.token_hex(4)}")
    view = sql.SQL("{}.result").format(schema)
    try:
        with conn.transaction():
            conn.execute('SET LOCAL search_path = "$user", public')
            if as_owner:
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
                conn.execute(sql.SQL("CREATE MATERIALIZED VIEW {} AS ").format(view) + sql.SQL(query)
                             + sql.SQL(" WITH NO DATA"))  # fmt: skip
                conn.execute(sql.SQL("ALTER MATERIALIZED VIEW {} OWNER TO {}").format(view, ident(owner)))
                conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(view))
                result = conn.execute(sql.SQL("SELECT * FROM {} LIMIT 1").format(view)).fetchone()
                raise _Rollback(result)
            conn.execute("SET TRANSACTION READ ONLY")
            raise _Rollback(conn.execute(sql.SQL(query)).fetchone())
    except _Rollback as done:
        result = done.row
    except psycopg.Error as exc:
        raise PgOpsError(f"verify_query failed on the restored copy: {one_line(exc)}", sqlstate=exc.sqlstate) from exc
    if not result or not result[0]:
        got = result[0] if result else "no row"
        raise PgOpsError(f"verify_query returned {got!r} on the restored copy, not true")


class _Rollback(Exception):
    """Leaves the verify transaction without keeping anything it made, carrying the result row."""

    def __init__(self, row: Any) -> None:
        super().__init__("rollback")
        self.row = row
