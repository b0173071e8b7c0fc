# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What would make a restore fail after hours of staging, found before anything is staged (check mode too).

Every problem is collected, then reported at once, each with what to run or set.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.dumpfile import DumpSource
from ansible_collections.pgops.dbrestore.plugins.module_utils.logical import problems as logical_problems
from ansible_collections.pgops.dbrestore.plugins.module_utils.pooler import Pooler
from ansible_collections.pgops.dbrestore.plugins.module_utils.pooler import problems as pooler_problems
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import ConnParams, PgOpsError, ServerInfo
from ansible_collections.pgops.dbrestore.plugins.module_utils.registry import Registry
from ansible_collections.pgops.dbrestore.plugins.module_utils.restart import RestartSpec, check_restart
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import list_sessions
from ansible_collections.pgops.dbrestore.plugins.module_utils.standbys import Standby
from ansible_collections.pgops.dbrestore.plugins.module_utils.standbys import problems as standby_problems
from ansible_collections.pgops.dbrestore.plugins.module_utils.tools import find_tool, tool_version

# the newest archive format version each pg_restore major reads (pg_backup_archiver.h, K_VERS_MAX)
ARCHIVE_MAX = {10: (1, 13), 11: (1, 13), 12: (1, 14), 13: (1, 14), 14: (1, 14), 15: (1, 14), 16: (1, 15),
               17: (1, 16), 18: (1, 16)}  # fmt: skip
# where distributions install the client tools of each major, newest first after sorting
CLIENT_BINDIRS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin")
_OWNER_TOOL_ARGS = ("-O", "--no-owner")
# "ALTER TABLE public.actor OWNER TO postgres;" in the dump's schema, the role maybe quoted
_OWNER_TO = re.compile(r'^ALTER .* OWNER TO ("(?:[^"]|"")+"|[^\s;]+);$', re.MULTILINE)


def _unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def reads_archive(major: int, version: tuple[int, int]) -> bool:
    return major > max(ARCHIVE_MAX) or version <= ARCHIVE_MAX.get(major, (1, 12))


def oldest_reader(version: tuple[int, int]) -> int:
    return min((m for m, top in ARCHIVE_MAX.items() if version <= top), default=max(ARCHIVE_MAX) + 1)


def choose_bindir(bindir: str | None, dump: DumpSource) -> tuple[str | None, str]:
    """bindir, or the newest installed client when the pg_restore on PATH cannot read the dump; and a note."""
    if not dump.is_archive:
        return bindir, ""
    need = dump.archive_version()
    tool = find_tool("pg_restore", bindir)
    major = tool_version(tool)[0]
    if reads_archive(major, need):
        return bindir, ""
    if bindir is None:
        found = {d: tool_version(os.path.join(d, "pg_restore"))
                 for d in (p for pattern in CLIENT_BINDIRS for p in glob.glob(pattern))
                 if os.access(os.path.join(d, "pg_restore"), os.X_OK)}  # fmt: skip
        for candidate in sorted(found, key=found.__getitem__, reverse=True):
            if reads_archive(found[candidate][0], need):
                return candidate, f"{tool} ({major}) cannot read this dump: using the client tools in {candidate}"
    oldest = oldest_reader(need)
    raise PgOpsError(
        f"{tool} ({major}) is too old for this dump (archive format {need[0]}.{need[1]}, which pg_restore {oldest} "
        f"and newer read): install the PostgreSQL {oldest}+ client tools and set bindir to their directory (for "
        f"example /usr/lib/postgresql/{oldest}/bin)"
    )


class Preflight:
    """Collects what would fail later; raise_if_any() reports them together."""

    def __init__(self, conn: Any, info: ServerInfo) -> None:
        self.conn, self.info = conn, info
        self.problems: list[str] = []

    def _one(self, query: str, params: tuple = ()) -> Any:
        return self.conn.execute(query, params).fetchone()[0]

    def can_create(self) -> Preflight:
        if not self._one("SELECT rolsuper OR rolcreatedb FROM pg_catalog.pg_roles WHERE rolname = current_user"):
            self.problems.append(
                f'role "{self.info.current_user}" may not create databases: ALTER ROLE "{self.info.current_user}" '
                "CREATEDB (or log in as a superuser)"
            )
        return self

    def can_record(self, registry: Registry) -> Preflight:
        """Our records need a schema of ours in the maintenance database: creating it needs CREATE there."""
        if not (registry.trusted and registry.accessible):
            self.problems.append(registry.warnings[-1])
        if not registry.exists and not self._one(
            "SELECT pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE')"
        ):
            db = self._one("SELECT pg_catalog.current_database()")
            self.problems.append(
                f'role "{self.info.current_user}" may not create the schema pgops_dbrestore for its records in "{db}": '
                f'GRANT CREATE ON DATABASE "{db}" TO "{self.info.current_user}", or let a superuser run CREATE SCHEMA '
                f'pgops_dbrestore AUTHORIZATION "{self.info.current_user}" there'
            )
        return self

    def can_switch(self, db: str, fallback: str, restart: RestartSpec | None) -> Preflight:
        """Owner rights on the live database (rename, close) and the right to end its sessions."""
        owner = self.conn.execute(
            "SELECT pg_catalog.pg_get_userbyid(datdba), pg_catalog.pg_has_role(datdba, 'MEMBER') "
            "FROM pg_catalog.pg_database WHERE datname = %s",
            (db,),
        ).fetchone()
        if owner is None:
            return self
        if not (self.info.is_superuser or owner[1]):
            self.problems.append(
                f'role "{self.info.current_user}" does not own "{db}" (owner: "{owner[0]}") and so may not rename or '
                f'close it: GRANT "{owner[0]}" TO "{self.info.current_user}", or log in as a superuser'
            )
        if fallback == "restart":
            self._sudo_allowed(restart)
            self._patroni(restart)
            return self
        stuck = sorted({s.user or "?" for s in list_sessions(self.conn, self.info, db) if not s.can_signal})
        if stuck:
            grant = f'GRANT pg_signal_backend TO "{self.info.current_user}"'
            self.problems.append(
                f'role "{self.info.current_user}" may not end the sessions of {", ".join(stuck)} on "{db}": {grant} '
                "(sessions of superusers need a superuser), or set fallback=restart"
            )
        for what, query, fix in _BLOCKERS:
            names = [r[0] for r in self.conn.execute(query, (db,)).fetchall()]
            if names:
                self.problems.append(f'"{db}" has {what} {", ".join(names)}: {fix}')
        return self

    def can_pause(self, poolers: tuple[Pooler, ...], fallback: str) -> list[str]:
        """Each PgBouncer's admin console answers and the database there can be paused; returns warnings (what
        pgbouncer_fallback=switch will leave unpaused)."""
        if not poolers:
            return []
        found, notes = pooler_problems(poolers, fallback)
        self.problems += found
        return notes

    def can_replicate(self, db: str, subscriptions: str, slots: str) -> Preflight:
        """Logical replication of the live database: refused unless logical_subscriptions / logical_slots say how."""
        self.problems += logical_problems(self.conn, self.info, db, subscriptions, slots)
        return self

    def can_follow(self, params: ConnParams, standbys: tuple[Standby, ...]) -> Preflight:
        """Each standby answers, is in recovery, and lets the login role end sessions there."""
        self.problems += standby_problems(params, self.info.version_num, standbys)
        return self

    def _patroni(self, restart: RestartSpec | None) -> None:
        """Restart through Patroni when it manages the server: its REST API answers, or nothing else is used."""
        if restart is None:
            return
        try:
            check_restart(restart)
        except PgOpsError as exc:
            self.problems.append(str(exc))

    def _sudo_allowed(self, restart: RestartSpec | None) -> None:
        argv = restart.argv() if restart else []
        if argv[:2] != ["sudo", "-n"]:
            return
        sudo_opts = argv[2 : argv.index("--")]
        command = argv[argv.index("--") + 1 :]
        probe = subprocess.run(["sudo", "-n", *sudo_opts, "-l", "--", *command], stdin=subprocess.DEVNULL,
                               capture_output=True, check=False)  # fmt: skip
        if probe.returncode != 0:
            self.problems.append(
                f"the restart command {' '.join(command)!r} may not run through sudo without a password and a tty "
                "for this user: write the rule with the pgops.dbrestore.sudo role (restore_restart_sudo)"
            )

    def dump_owners(self, dump: DumpSource, bindir: str | None, tool_args: tuple[str, ...]) -> Preflight:
        """The roles owning the dump's objects exist, and a non-superuser may SET ROLE to them."""
        if any(a in _OWNER_TOOL_ARGS for a in tool_args) or not dump.is_archive:
            return self
        schema = subprocess.run(
            [find_tool("pg_restore", bindir), "--schema-only", "-f", "-", dump.child_path],
            pass_fds=(dump.fd,),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        owners = sorted({_unquote(m.group(1)) for m in _OWNER_TO.finditer(schema.stdout.decode(errors="replace"))})
        if not owners:
            return self
        rows = self.conn.execute(
            "SELECT o, r.oid IS NOT NULL, coalesce(pg_catalog.pg_has_role(r.oid, 'MEMBER'), false) "
            "FROM pg_catalog.unnest(%s::text[]) o LEFT JOIN pg_catalog.pg_roles r ON r.rolname = o ORDER BY o",
            (owners,),
        ).fetchall()  # fmt: skip
        missing = [r[0] for r in rows if not r[1]]
        foreign = [r[0] for r in rows if r[1] and not r[2]]
        fix = "or add --no-owner --no-privileges to tool_args"
        if missing:
            self.problems.append(f"the dump's objects belong to roles that do not exist here ({', '.join(missing)}): "
                                 f"create them, {fix}")  # fmt: skip
        if foreign and not self.info.is_superuser:
            self.problems.append(
                f'role "{self.info.current_user}" may not SET ROLE to {", ".join(foreign)}, which own objects of the '
                f"dump: GRANT them to it, {fix}"
            )
        return self

    def raise_if_any(self) -> None:
        if self.problems:
            listed = " ".join(f"({n}) {p}." for n, p in enumerate(self.problems, 1))
            raise PgOpsError(f"nothing was changed: the restore would fail later. {listed}", problems=self.problems)


# What keeps a database from being renamed or dropped, and how to clear it
_BLOCKERS = (
    ("prepared transactions", "SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE database = %s ORDER BY 1",
     "finish them first (COMMIT PREPARED or ROLLBACK PREPARED '<gid>')"),
)  # fmt: skip
