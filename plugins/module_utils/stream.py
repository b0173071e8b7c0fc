# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A source database instead of a dump file: pg_dump of it streamed into the staging copy, no file between.

pg_dump reads the source in one REPEATABLE READ, READ ONLY transaction (one snapshot), and its
session starts with default_transaction_read_only on. Its plain SQL goes through the same filter
as a plain dump file (our \\restrict key, statements on other databases left out) into
psql --single-transaction: a source that dies midway, or a killed run, commits nothing.
A pipe has no random access, so the load is one connection (pg_restore --jobs needs a file).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.dumpfile import PlainFilter
from ansible_collections.pgops.dbrestore.plugins.module_utils.load import LoadOptions, conninfo_for, psql_argv
from ansible_collections.pgops.dbrestore.plugins.module_utils.operation import pause_point
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    ConnParams,
    PgOpsError,
    ServerInfo,
    connect,
    server_info,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.tools import (
    ToolOutput,
    find_tool,
    run_tool,
    tool_version,
)

# SET lines pg_dump writes that an older target server may not know; left out when it does not
_NEWER_SETTINGS = ("transaction_timeout", "default_table_access_method", "idle_in_transaction_session_timeout",
                   "row_security", "default_toast_compression")  # fmt: skip


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

    def load_into(self, target: ConnParams, target_conn: Any, dbname: str, opts: LoadOptions) -> list[str]:
        """pg_dump of the source piped into psql on dbname; returns the statements left out."""
        known = {r[0] for r in target_conn.execute("SELECT name FROM pg_catalog.pg_settings").fetchall()}
        flt = PlainFilter(unknown_settings=tuple(s for s in _NEWER_SETTINGS if s not in known),
                          restrict_key=secrets.token_hex(16))  # fmt: skip
        env = self.params.tool_env()
        env["PGOPTIONS"] = "-c default_transaction_read_only=on"
        argv = [find_tool("pg_dump", opts.bindir), "--format=plain", "--no-password", *opts.tool_args,
                "-d", conninfo_for(self.params.login_db)]  # fmt: skip
        psql = psql_argv(opts.bindir, dbname, ())
        with ToolOutput(argv, env) as out:
            try:
                run_tool(psql, target.tool_env(), feed=_pausing(flt.lines(out)))
            except PgOpsError as exc:
                raise PgOpsError(f"streaming {self.path} failed: {exc}", sqlstate=exc.sqlstate) from exc
        return flt.dropped


def _pausing(lines: Iterator[bytes]) -> Iterator[bytes]:
    """The lines, with the test-only pause point "streaming" once the first ones are on their way."""
    for n, line in enumerate(lines):
        yield line
        if n == 100:
            pause_point("streaming")
