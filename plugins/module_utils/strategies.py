# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The restore strategies, each an ordered list of named steps built after looking at the server.

swap: stage into <db>_pgops_staging, verify, then close + clear the live database and rename
live -> <db>_prev_<UTC time>, staging -> <db> in one transaction. replace: close, clear, drop,
then restore (for hosts without room for two copies). rollback: swap the newest previous copy
we recorded back. A set of databases runs phase=stage on all, then phase=switch (or abort).
A new strategy is one class here, registered in STRATEGIES or chosen in plan_for().
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.barrier import close_steps, held_state, open_steps
from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import (
    BlockState,
    best_method,
    block_method,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.copies import (
    DatabaseSettings,
    apply_settings,
    close_database,
    create_database,
    drop_database,
    drop_statement,
    free_name,
    previous_name,
    read_settings,
    staging_name,
    undone_name,
    utc_stamp,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.dumpfile import DumpSource
from ansible_collections.pgops.dbrestore.plugins.module_utils.guard import BlockGuard
from ansible_collections.pgops.dbrestore.plugins.module_utils.keep import (
    Carrier,
    parse_tables,
    preflight_problems,
    schema_sql,
    source_preflight_problems,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.load import (
    LoadOptions,
    check_readable,
    restore_into,
    verify,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.operation import Operation, Step, pause_point
from ansible_collections.pgops.dbrestore.plugins.module_utils.parallel import large_tables
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    PgOpsError,
    connect,
    database_oid,
    execute,
    ident,
    sql,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.preflight import Preflight, choose_bindir
from ansible_collections.pgops.dbrestore.plugins.module_utils.pruner import BackgroundDrop
from ansible_collections.pgops.dbrestore.plugins.module_utils.registry import Copy, Registry
from ansible_collections.pgops.dbrestore.plugins.module_utils.sanitize import (
    Script,
    load_scripts,
    owner_problems,
    run_scripts,
    scripts_digest,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import (
    Closure,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.standbys import discover
from ansible_collections.pgops.dbrestore.plugins.module_utils.stream import ServerSource, source_params
from ansible_collections.pgops.dbrestore.plugins.module_utils.switch import (
    Logical,
    close_and_clear,
    follow_standbys,
    in_transaction_retrying,
    pause_text,
    record_clear,
    rename,
    rollback_sql,
    standby_text,
)

# all: the whole restore; stage/switch split it so a set of databases (shards) is switched only
# when every staged copy verified; abort drops a staged copy; close/open hold every database of a
# set closed from before the first switch to after the last (barrier.py)
PHASES = ("all", "stage", "close", "switch", "open", "abort")


class Target:
    """The database a run restores and the copies around it, as found before any step runs."""

    def __init__(self, op: Operation) -> None:
        self.op = op
        self.db = op.req.db
        if self.db == op.params.login_db:
            raise PgOpsError(
                f'"{self.db}" is the maintenance database (login_db) this run connects to: set login_db to another '
                "database (postgres, template1) to restore it"
            )
        self.live_oid = database_oid(op.conn, self.db)
        self.staging = op.res.staging_db = staging_name(self.db)
        self.staging_oid = database_oid(op.conn, self.staging)
        if self.staging_oid is not None and not self._ours(self.staging_oid):
            raise PgOpsError(
                f'a database named "{self.staging}" exists that pgops.dbrestore did not make (owner is not the '
                "login role and no record of ours names it); nothing was changed: rename or drop it, then run again"
            )
        self.method = best_method(op.info, op.req.block_new_connections)
        self.bindir = op.req.bindir  # or a newer installed client, when the dump needs one
        self.drops_after_switch = False  # a copy is dropped once switched (set while planning the switch)
        self.pruner: BackgroundDrop | None = None

    def start_pruner(self) -> BackgroundDrop:
        """The child that will drop the old copies; started early so that it is ready when they are."""
        if self.pruner is None:
            self.pruner = BackgroundDrop(self.op.params, self.db)
            self.op.closers.append(self.pruner.close)
        return self.pruner

    def preflight(self) -> Preflight:
        """The checks every path that switches the live database needs."""
        req = self.op.req
        checks = Preflight(self.op.conn, self.op.info).can_record(self.op.registry)
        if self.live_oid is not None:
            checks.can_switch(self.db, req.fallback, req.restart)
            checks.can_replicate(self.db, req.logical_subscriptions, req.logical_slots)
            self.op.res.warnings += checks.can_pause(req.pgbouncers, req.pgbouncer_fallback)
            if req.discover_standbys:
                checks.problems += self._discover_standbys()
            checks.can_follow(self.op.params, self.op.standbys)
        return checks

    def _discover_standbys(self) -> list[str]:
        """discover_standbys: the standbys to follow are the ones streaming from the primary now."""
        op = self.op
        op.standbys, found = discover(op.conn, op.info.version_num, op.req.standbys)
        if not op.standbys and not found:
            op.res.warnings.append("discover_standbys: no standby streams from the primary (pg_stat_replication "
                                   "is empty); none will follow the switch")  # fmt: skip
        return found

    def _ours(self, oid: int) -> bool:
        row = self.op.conn.execute(
            "SELECT pg_catalog.pg_get_userbyid(datdba) = current_user FROM pg_catalog.pg_database WHERE oid = %s",
            (oid,),
        ).fetchone()
        return bool(row and row[0]) or any(c.oid == oid for c in self.op.registry.copies(self.db, "staging"))

    def copies(self, kind: str) -> list[Copy]:
        return self.op.registry.copies(self.db, kind)


# --- steps shared by the strategies ----------------------------------------------------------


def drop_leftover(t: Target, why: str) -> Step:
    op = t.op

    def run() -> None:
        drop_database(op.params, op.info, t.staging, op.req.wait_timeout)
        op.registry.forget(t.staging_oid)  # type: ignore[arg-type]
        op.res.dropped.append(t.staging)
        op.res.log.append(f'dropped "{t.staging}" ({why})')

    return Step("leftover", f'drop "{t.staging}" ({why})', run)


class Staging:
    """Create the staging copy, load the dump, verify it and give it the live settings."""

    def __init__(self, t: Target, dump: DumpSource | ServerSource, scripts: list[Script] | None = None) -> None:
        self.t, self.dump = t, dump
        self.scripts = scripts or []
        self.owner = sanitize_owner(t) if self.scripts else ""  # read now: replace drops the live one first
        self.live: DatabaseSettings | None = None
        self.split: frozenset[tuple[str, str]] = frozenset()

    def plan_split(self) -> None:
        """The live database's large tables, loaded by several COPY sessions each (found before the steps run)."""
        op, t, req = self.t.op, self.t, self.t.op.req
        if req.parallel_table_mb and req.load_jobs > 1 and self.dump.format != "server" \
                and not req.tool_args and t.live_oid is not None and req.strategy == "swap":  # fmt: skip
            try:
                self.split = frozenset(large_tables(op.params, t.db, req.parallel_table_mb << 20))
            except PgOpsError as exc:  # a faster load is not worth failing for: restore as a whole
                op.res.warnings.append(f'cannot read the table sizes of "{t.db}" ({exc}): no table is split')

    def steps(self) -> list[Step]:
        t, fmt, req = self.t, self.dump.format, self.t.op.req
        split = ""
        if self.split:
            names = ", ".join(sorted(".".join(n) for n in self.split))
            split = f" ({names}: {req.load_jobs} COPY sessions each when in the dump)"
        elif isinstance(self.dump, ServerSource) and req.parallel_table_mb and self.dump.splits_tables() \
                and self.dump.in_parallel(req.load_jobs, req.tool_args, t.bindir, t.op.info.version_num):  # fmt: skip
            split = f" (tables of at least {req.parallel_table_mb} MB: {req.load_jobs} COPY sessions each)"
        what = (f"stream {self.dump.path} into it" if fmt == "server" else f"restore the {fmt} dump into it") + split
        steps = [Step("stage", f'create "{t.staging}" and {what}', self._load)]
        if self.scripts:
            names = ", ".join(s.name for s in self.scripts)
            text = f'sanitize "{t.staging}" as "{self.owner}" ({names})'
            steps.append(Step("sanitize", text, lambda: self._guarded(self._run_sanitize)))
        steps.append(Step("verify", f'verify "{t.staging}" and give it the settings of "{t.db}"', self._verify))
        return steps

    def _run_sanitize(self) -> None:
        op, t = self.t.op, self.t
        owner = self.owner
        for done in run_scripts(op.params, t.staging, self.scripts, owner):
            op.res.sanitized.append(done)
            op.res.log.append(f'sanitize script {done["name"]} ran on "{t.staging}" as "{owner}" in {done["ms"]} ms')

    def _load(self) -> None:
        op, t, req = self.t.op, self.t, self.t.op.req
        if t.drops_after_switch and req.phase == "all":
            t.start_pruner()  # imported and connected while the dump loads
        if self.live is None and database_oid(op.conn, t.db) is not None:  # replace read it before the drop
            self.live = read_settings(op.conn, t.db)
        locale = {"ENCODING": req.encoding, "LC_COLLATE": req.lc_collate, "LC_CTYPE": req.lc_ctype}
        if self.live is not None:
            live_locale = {"ENCODING": self.live.encoding, "LC_COLLATE": self.live.collate,
                           "LC_CTYPE": self.live.ctype}  # fmt: skip
            locale = {k: v or live_locale[k] for k, v in locale.items()}
        t.staging_oid = create_database(op.conn, t.staging, req.template, req.owner, locale)
        op.res.created.append(t.staging)
        op.res.log.append(f'created "{t.staging}"')
        op.registry.add_copy(t.staging_oid, t.staging, t.db, "staging", BlockState(t.method.name, closed=False))
        self._guarded(self._run_load)

    def _run_load(self) -> None:
        op, t, req = self.t.op, self.t, self.t.op.req
        opts = LoadOptions(bindir=t.bindir, jobs=req.load_jobs, tool_args=req.tool_args, split=self.split,
                           split_bytes=req.parallel_table_mb << 20)  # fmt: skip
        if isinstance(self.dump, ServerSource):
            op.res.stripped_statements = self.dump.load_into(op.params, op.conn, t.staging, opts, op.progress)
            how = (f"{self.dump.streams} pg_dump | pg_restore streams on one snapshot, indexes by {req.load_jobs} jobs"
                   if self.dump.streams > 1 else "pg_dump | psql")  # fmt: skip
            op.res.log.append(f'streamed {self.dump.path} into "{t.staging}" ({how}, no file)')
            if opts.split_loaded:
                op.res.log.append(
                    f"loaded {', '.join(opts.split_loaded)} by {req.load_jobs} COPY sessions each, "
                    f"a range of pages each (at least {req.parallel_table_mb} MB in the source)"
                )
            return
        op.res.stripped_statements = restore_into(op.params, op.info, t.staging, self.dump, opts, op.progress)
        if opts.split_loaded:
            rest = "pg_restore --jobs" if self.dump.is_archive else "psql sessions around them"
            op.res.log.append(f"loaded {', '.join(opts.split_loaded)} by {req.load_jobs} COPY sessions each (at least "
                              f"{req.parallel_table_mb} MB in \"{t.db}\"){opts.split_read_how()}, "
                              f"the rest by {rest}")  # fmt: skip
        self.dump.unchanged(op.res.sha256)
        op.res.log.append(f'restored the {self.dump.format} dump into "{t.staging}"')

    def _verify(self) -> None:
        self._guarded(self._run_verify)

    def _run_verify(self) -> None:
        op, t, req = self.t.op, self.t, self.t.op.req
        owner = req.owner or (self.live.owner if self.live else op.info.current_user)
        verify(op.params, t.staging, req.verify_query, owner, req.analyze, req.load_jobs)
        marker = {"sha256": op.res.sha256, "format": self.dump.format, "size": self.dump.size,
                  "src": source_name(self.dump), "writes": settled_writes(op, t.staging_oid, t.staging)}  # fmt: skip
        if not isinstance(self.dump, ServerSource):
            marker["identity"] = self.dump.identity_key
        if self.scripts:
            marker["sanitize"] = scripts_digest(self.scripts)
        op.registry.write_marker(t.staging_oid, t.staging, marker)  # type: ignore[arg-type]
        if self.live is not None:
            op.res.log += [f"carried over: {s}" for s in apply_settings(op.conn, t.staging, self.live, req.owner)]
        op.res.log.append(f'verified "{t.staging}"')

    def _guarded(self, body: Callable[[], None]) -> None:
        """On any failure the staging copy goes; the live database was not touched."""
        op, t = self.t.op, self.t
        try:
            body()
        except BaseException as exc:
            _drop_quietly(op, t.staging, t.staging_oid)
            if isinstance(exc, PgOpsError):
                if t.db in op.res.dropped:
                    where = "was dropped before the restore (strategy=replace): restore it again from a good dump"
                else:
                    where = "was not touched" if self.live is not None else "was not created"
                what = (
                    f"refresh from {self.dump.path}"
                    if isinstance(self.dump, ServerSource)
                    else f"restore of {self.dump.path!r}"
                )
                raise PgOpsError(f'{what} failed; "{t.db}" {where} and the staging copy was '
                                 f"removed: {exc}", sqlstate=exc.sqlstate, **exc.details) from exc  # fmt: skip
            raise


def source_name(source: DumpSource | ServerSource) -> str:
    """The record's src: a dump's file name, or where a source database was read (user@host:port/db)."""
    return source.path if isinstance(source, ServerSource) else os.path.basename(source.path.rstrip("/"))


def sanitize_owner(t: Target) -> str:
    """The role the sanitize scripts run as: the restored copy's owner (owner, else the live one's)."""
    op = t.op
    if op.req.owner:
        return op.req.owner
    if t.live_oid is not None:
        row = op.conn.execute("SELECT pg_catalog.pg_get_userbyid(datdba) FROM pg_catalog.pg_database WHERE oid = %s",
                              (t.live_oid,)).fetchone()  # fmt: skip
        if row:
            return str(row[0])
    return op.info.current_user


def _drop_quietly(op: Operation, name: str, oid: int | None) -> None:
    try:
        drop_database(op.params, op.info, name, op.req.wait_timeout)
        op.registry.forget(oid)  # type: ignore[arg-type]
        if name in op.res.created:  # made and dropped by this run: no trace left
            op.res.created.remove(name)
        else:
            op.res.dropped.append(name)
        op.res.log.append(f'dropped "{name}" after the failure')
    except PgOpsError:
        pass  # reported by the next run, which drops the leftover first


def prune(t: Target, kind: str, keep: int, planned: list[str]) -> list[Step]:
    """Drop our copies of one kind beyond the newest `keep` once the steps before ran (planned: their names now).

    Each is closed and cleared here; the DROP itself runs after the module returns (pruner.py).
    """
    op = t.op
    if not planned:
        return []

    t.drops_after_switch = True

    def run() -> None:
        gone = t.copies(kind)[keep:]
        statements: list[str] = []
        for copy in gone:
            close_database(op.params, op.info, copy.name, op.req.wait_timeout)
            drop_and_forget = [drop_statement(copy.name), *op.registry.forget_statements(copy.oid)]
            statements += [s.as_string(op.conn) for s in drop_and_forget]
        if t.start_pruner().hand(statements):
            op.res.dropping += [c.name for c in gone]
            op.res.log += [f'dropping old copy "{c.name}" after this run returns (keep_previous={keep}); the next '
                           f'run of "{t.db}" waits for it' for c in gone]  # fmt: skip
        else:
            for copy in gone:
                drop_database(op.params, op.info, copy.name, op.req.wait_timeout)
                op.registry.forget(copy.oid)
                op.res.dropped.append(copy.name)
                op.res.log.append(f'dropped old copy "{copy.name}" (keep_previous={keep})')
        if op.res.previous_db in op.res.dropped + op.res.dropping:
            op.res.previous_db, op.res.rollback, op.res.rollback_sql = "", {}, []

    names = ", ".join(f'"{n}"' for n in planned)
    return [Step("prune", f"drop {names} (keep_previous={keep})", run)]


def planned_prune(t: Target, kind: str, new_copy: str) -> list[str]:
    """The copies of a kind that go once new_copy joins them, keeping keep_previous."""
    keep = t.op.req.keep_previous
    existing = [c.name for c in t.copies(kind)]
    return existing[max(keep - 1, 0) :] + ([new_copy] if keep == 0 else [])


# --- strategies --------------------------------------------------------------------------------


class DumpRestore:
    """What swap and replace share: open and read the dump, decide whether there is anything to do."""

    name = ""

    def steps(self, op: Operation) -> list[Step]:
        t = Target(op)
        if op.req.source:
            return self.from_server(op, t)
        dump = DumpSource(op.req.src)  # type: ignore[arg-type]
        op.closers.append(dump.close)
        res = op.res
        with op.phase("inspect"):
            res.format = dump.format
            res.marker_before = op.registry.marker(t.live_oid)
            res.sha256 = dump_sha256(op, dump, res.marker_before)
            _sizes(op, t)
        scripts, script_problems = load_scripts(op.req.sanitize)
        new_marker = {"sha256": res.sha256, "format": dump.format, "size": dump.size,
                      "src": os.path.basename(dump.path.rstrip("/")), "identity": dump.identity_key}  # fmt: skip
        if scripts:
            new_marker["sanitize"] = scripts_digest(scripts)
        res.diff = {"before": {"marker": res.marker_before}, "after": {"marker": new_marker}}
        leftover = [drop_leftover(t, "left behind by an interrupted run")] if t.staging_oid is not None else []
        same = res.marker_before and res.marker_before["sha256"] == res.sha256
        if same and res.marker_before.get("sanitize", "") == new_marker.get("sanitize", "") and not op.req.force:
            res.diff["after"]["marker"] = res.marker_before
            res.log.append(_already_holds(op, t))
            remember_identity(op, t.live_oid, dump, res.marker_before)
            return leftover
        with op.phase("preflight"):
            t.bindir, note = choose_bindir(op.req.bindir, dump)
            if note:
                res.log.append(note)
            checks = t.preflight().can_create().dump_owners(dump, t.bindir, op.req.tool_args)
            checks.problems += script_problems
            if op.req.sanitize:
                checks.problems += owner_problems(op.conn, sanitize_owner(t))
            checks.problems += keep_tables_problems(t, dump)
            checks.raise_if_any()
            full = op.check_mode or self.name == "replace"
            res.stripped_statements = check_readable(dump, t.bindir, full=full)
            staging = Staging(t, dump, scripts)
            staging.plan_split()
        return leftover + self.after_leftover(t, staging)

    def from_server(self, op: Operation, t: Target) -> list[Step]:
        """A source database streamed in: no file, no hash; every run restores (the source moves on)."""
        res, source = op.res, ServerSource(source_params(op.req.source))  # type: ignore[arg-type]
        with op.phase("inspect"):
            res.format = source.format
            res.marker_before = op.registry.marker(t.live_oid)
            _sizes(op, t)
        scripts, script_problems = load_scripts(op.req.sanitize)
        new_marker = {"sha256": "", "format": source.format, "size": 0, "src": source.path}
        if scripts:
            new_marker["sanitize"] = scripts_digest(scripts)
        res.diff = {"before": {"marker": res.marker_before}, "after": {"marker": new_marker}}
        leftover = [drop_leftover(t, "left behind by an interrupted run")] if t.staging_oid is not None else []
        with op.phase("preflight"):
            checks = t.preflight().can_create()
            unreadable = source.problems(t.bindir)
            checks.problems += unreadable + script_problems
            if op.req.sanitize:
                checks.problems += owner_problems(op.conn, sanitize_owner(t))
            if not unreadable:  # a source that cannot be read is reported once, above
                checks.problems += keep_tables_source_problems(t, source)
            checks.raise_if_any()
        return leftover + self.after_leftover(t, Staging(t, source, scripts))

    def after_leftover(self, t: Target, staging: Staging) -> list[Step]:
        raise NotImplementedError


def dump_sha256(op: Operation, dump: DumpSource, *markers: dict[str, Any] | None) -> str:
    """The dump's sha256: a record's, when the file's identity is the one recorded with it; else read and hashed.

    verify_checksum=full always reads and hashes the whole dump. An older record without identity
    is compared by hash.
    """
    if op.req.verify_checksum == "identity":
        for marker in markers:
            if marker and marker.get("identity") == dump.identity_key:
                op.res.checksum_by = "identity"
                return str(marker["sha256"])
    op.res.checksum_by = "full"
    return dump.fingerprint()


def remember_identity(op: Operation, oid: int | None, dump: DumpSource, marker: dict[str, Any] | None) -> None:
    """The hash found the same dump under a new identity (copied, touched): record it; the next run reads nothing."""
    if oid is not None and marker and marker.get("identity") != dump.identity_key and not op.check_mode:
        op.registry.set_identity(oid, dump.identity_key)
        marker["identity"] = dump.identity_key


def _already_holds(op: Operation, t: Target) -> str:
    marker = op.res.marker_before or {}
    how = "same file, not read again" if op.res.checksum_by == "identity" else "same sha256"
    line = (f'"{t.db}" already holds this dump ({how}: sha256 {op.res.sha256[:12]}…, restored '
            f'{marker.get("restored_at")})')  # fmt: skip
    writes = _writes(op, t.live_oid)
    if marker.get("writes") is not None and writes is not None and writes > marker["writes"]:
        line += f"; it was written since ({writes - marker['writes']} row changes): force=true restores it again"
    return line + "; nothing to do"


def _writes(op: Operation, oid: int | None) -> int | None:
    """Rows written to the database so far by the statistics; None before 15, whose counters arrive late."""
    if op.info.version_num < 150000:
        return None
    row = op.conn.execute(
        "SELECT tup_inserted + tup_updated + tup_deleted FROM pg_catalog.pg_stat_database WHERE datid = %s", (oid,)
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def settled_writes(op: Operation, oid: int, name: str) -> int | None:
    """_writes once every client session on the database is gone: a backend reports its counts as it exits.

    Autovacuum, which starts on the tables a load just filled, counts no row writes and is not waited for (it kept
    this wait at its 10 s limit after loading many tables).
    """
    deadline = time.monotonic() + 10
    clients = " AND backend_type = 'client backend'" if op.info.version_num >= 100000 else ""
    query = "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE datname = %s" + clients
    while op.conn.execute(query, (name,)).fetchone()[0]:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    return _writes(op, oid)


def _sizes(op: Operation, t: Target) -> None:
    """Size of the live database and where the cluster keeps its data, for disk-space checks."""
    if t.live_oid is not None:
        row = op.conn.execute(
            "SELECT CASE WHEN pg_catalog.has_database_privilege(%s::oid, 'CONNECT') "
            "OR pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE') THEN pg_catalog.pg_database_size(%s::oid) END",
            (t.live_oid, t.live_oid),
        ).fetchone()
        op.res.live_size_bytes = int(row[0] or 0)
    if op.info.is_superuser or op.conn.execute("SELECT pg_catalog.pg_has_role('pg_read_all_settings', 'USAGE')"
                                               ).fetchone()[0]:  # fmt: skip
        op.res.data_directory = op.conn.execute("SELECT pg_catalog.current_setting('data_directory')").fetchone()[0]
    else:
        op.res.warnings.append("the login role may not read data_directory (pg_read_all_settings): no disk-space facts")


class Swap(DumpRestore):
    name = "swap"

    def after_leftover(self, t: Target, staging: Staging) -> list[Step]:
        op = t.op
        if op.req.phase == "stage":
            done = Step("staged", f'keep "{t.staging}" for phase=switch', lambda: _mark_staged(op, t), changes=False)
            return [*staging.steps(), done]
        if t.live_oid is None:
            return [*staging.steps(), Step("switch", f'rename "{t.staging}" to "{t.db}"', lambda: _create_live(op, t))]
        return [*staging.steps(), *switch_steps(t)]


def _mark_staged(op: Operation, t: Target) -> None:
    op.res.staged = True
    op.res.log.append(f'"{t.staging}" is restored and verified; phase=switch puts it in place of "{t.db}"')


def _create_live(op: Operation, t: Target) -> None:
    def body() -> None:
        rename(op.conn, t.staging, t.db, op.res)
        op.registry.forget_copy(t.staging_oid)  # type: ignore[arg-type]

    in_transaction_retrying(op.conn, op, [t.staging], body)
    op.res.switched_at = time.time()
    op.res.log.append(f'"{t.db}" did not exist: created it from the dump')


def keep_tables_problems(t: Target, dump: DumpSource) -> list[str]:
    """keep_tables' preflight: a superuser login, and each table in the live database and the dump alike."""
    tables = parse_tables(t.op.req.keep_tables)
    if not tables:
        return []
    dump_sql = schema_sql(dump, t.bindir, tables)
    if t.live_oid is None:
        return preflight_problems(t.op.conn, t.op.info, tables, False, dump_sql)
    with connect(t.op.params.with_db(t.db)) as live:
        return preflight_problems(live, t.op.info, tables, True, dump_sql)


def keep_tables_source_problems(t: Target, source: ServerSource) -> list[str]:
    """keep_tables' preflight for a source database: each table in the live database and the source alike."""
    tables = parse_tables(t.op.req.keep_tables)
    if not tables:
        return []
    with connect(source.params) as src:
        if t.live_oid is None:
            return source_preflight_problems(t.op.conn, t.op.info, tables, False, src)
        with connect(t.op.params.with_db(t.db)) as live:
            return source_preflight_problems(live, t.op.info, tables, True, src)


class KeepTables:
    """Step "keep": carry the live rows of keep_tables into the staged copy inside the switch window.

    Before the window: connect to the live database and the staged copy, and check that each
    table's columns are the same in both (catalogs) and that writing them runs no app code. In the
    window (called by the switch once the live database is closed and cleared): copy the rows
    (keep.Carrier.carry), then close the connection into the live database so it can be renamed.
    """

    def __init__(self, t: Target) -> None:
        self.t = t
        self.tables = parse_tables(t.op.req.keep_tables)
        self.carrier: Carrier | None = None

    def steps(self) -> list[Step]:
        if not self.tables:
            return []
        names = ", ".join(str(x) for x in self.tables)
        return [Step("keep", f'check {names} in "{self.t.staging}" against "{self.t.db}"', self._prepare)]

    def _prepare(self) -> None:
        op, t = self.t.op, self.t
        carrier = Carrier(op.params, t.db, t.staging, self.tables)
        try:
            carrier.check()
        except BaseException:
            carrier.close()
            _drop_quietly(op, t.staging, t.staging_oid)
            raise
        self.carrier = carrier

    @property
    def spare_app(self) -> str:
        return self.carrier.app_name if self.carrier else ""

    def carry(self) -> None:
        """In the window: the rows, then the live connection goes (a database with sessions cannot be renamed)."""
        if self.carrier is None:
            return
        try:
            carried = self.carrier.carry()
        finally:
            self.carrier.close()
        self.t.op.res.kept_tables = {"rows": carried.rows, "ms": carried.ms}
        rows = ", ".join(f"{n} {name}" for name, n in carried.rows.items())
        self.t.op.res.log.append(f"switch: carried the live rows into the restored copy ({rows}) in {carried.ms} ms")

    def close(self) -> None:
        if self.carrier is not None:
            self.carrier.close()


def switch_steps(t: Target) -> list[Step]:
    """Close + clear live, carry keep_tables, rename live -> previous and staging -> live in one transaction; prune."""
    op, req = t.op, t.op.req
    prev = free_name(op.conn, previous_name(t.db, utc_stamp()))
    keep = KeepTables(t)

    logical = Logical(op)

    def run() -> None:
        def renames(conn: Any, closure: Closure | None) -> None:
            found = closure.state if closure else BlockState(t.method.name, closed=False)
            registry = Registry(conn)
            started = time.monotonic()
            keep.carry()
            if keep.tables:
                op.res.pgbouncer_window_ms["keep"] = int((time.monotonic() - started) * 1000)
            states: list[BlockState] = []

            def body() -> None:
                # closed by phase=close: the copy switched out keeps the state from before that
                states[:] = [held_state(registry, t.live_oid, found)]
                rename(conn, t.db, prev, op.res)
                rename(conn, t.staging, t.db, op.res)
                registry.add_copy(t.live_oid, prev, t.db, "previous", states[0])  # type: ignore[arg-type]
                registry.forget_copy(t.staging_oid)  # type: ignore[arg-type]

            started = time.monotonic()
            in_transaction_retrying(conn, op, [t.db, t.staging], body)
            op.res.pgbouncer_window_ms["rename"] = int((time.monotonic() - started) * 1000)
            state = states[0]
            op.res.switched_at = time.time()  # committed: a set across hosts reports the spread of these
            pause_point("switched")  # renamed, the old copy still closed
            op.res.rollback_sql = rollback_sql(op, t.method, state, prev)

        try:
            logical.prepare(t.staging_oid)  # type: ignore[arg-type]
            close_and_clear(op, t.method, renames, keep.spare_app, paused=True)
        except BaseException:
            keep.close()
            if f"{t.db} -> {prev}" not in op.res.renamed:
                logical.give_back()
                _drop_quietly(op, t.staging, t.staging_oid)
            raise
        op.res.previous_db = prev
        op.res.rollback = {"db": t.db, "rollback": True}
        paused = f", PgBouncer paused {op.res.pgbouncer_pause_ms} ms" if req.pgbouncers else ""
        op.res.log.append(
            f'switched: "{t.db}" is the restored copy, the old one is "{prev}"; app-visible window '
            f"{op.res.switch_window_ms} ms, {op.res.terminated_count} session(s) ended{paused}"
        )
        logical.finish(prev)
        follow_standbys(op, prev)

    carried = f", carry the live rows of {', '.join(str(x) for x in keep.tables)}" if keep.tables else ""
    text = (
        pause_text(op)
        + f'close and clear "{t.db}" ({t.method.name}){carried}, rename it to "{prev}" and "{t.staging}" to "{t.db}"'
        + logical.text()
        + standby_text(op)
    )
    return [*keep.steps(), Step("switch", text, run),
            *prune(t, "previous", req.keep_previous, planned_prune(t, "previous", prev))]  # fmt: skip


class Replace(DumpRestore):
    """Drop first: for hosts without room for two copies. The outage lasts the whole restore."""

    name = "replace"

    def after_leftover(self, t: Target, staging: Staging) -> list[Step]:
        op = t.op
        if t.live_oid is None:
            return [*staging.steps(), Step("switch", f'rename "{t.staging}" to "{t.db}"', lambda: _create_live(op, t))]
        started: list[float] = []

        def drop_live() -> None:
            started.append(time.monotonic())
            staging.live = read_settings(op.conn, t.db)

            def drop(conn: Any, _closure: Closure | None) -> None:
                execute(conn, sql.SQL("DROP DATABASE {}").format(ident(t.db)), f'cannot drop "{t.db}"')

            close_and_clear(op, t.method, drop)
            op.registry.forget(t.live_oid)  # type: ignore[arg-type]
            op.res.dropped.append(t.db)
            op.res.log.append(f'dropped "{t.db}" (strategy=replace) after ending {op.res.terminated_count} session(s)')

        def put_in_place() -> None:
            _create_live(op, t)
            op.res.switch_window_ms = int((time.monotonic() - started[0]) * 1000)
            op.res.log.append(f'"{t.db}" restored in place; outage {op.res.switch_window_ms} ms (the whole restore)')

        return [
            Step("switch", f'close and clear "{t.db}" ({t.method.name}) and drop it', drop_live),
            *staging.steps(),
            Step("rename", f'rename "{t.staging}" to "{t.db}"', put_in_place),
        ]


class Rollback:
    """Swap the newest previous copy we recorded back; the replaced database is kept as <db>_undone_<time>."""

    def steps(self, op: Operation) -> list[Step]:
        t = Target(op)
        prevs = t.copies("previous")
        if not prevs:
            raise PgOpsError(
                f'no previous copy of "{t.db}" recorded by pgops.dbrestore to roll back to; nothing was changed'
            )
        prev = prevs[0]
        t.preflight().raise_if_any()
        undone = free_name(op.conn, undone_name(t.db, utc_stamp()))
        op.res.previous_db = prev.name
        op.res.marker_before = op.registry.marker(t.live_oid)
        back = block_method(prev.block_state.method)
        logical = Logical(op)

        def run() -> None:
            # the previous copy is closed since it was switched out: if we die after the rename, it reopens
            guard = BlockGuard(op.params, t.db, [s.as_string(op.conn) for s in back.open_sql(t.db, prev.block_state)])
            try:
                if t.live_oid is None:
                    renames(op.conn, None)
                else:
                    logical.prepare(prev.oid)
                    try:
                        close_and_clear(op, t.method, renames, paused=True)
                    except BaseException:
                        if f"{t.db} -> {undone}" not in op.res.renamed:
                            logical.give_back()
                        raise
            finally:
                guard.release()

        def renames(conn: Any, closure: Closure | None) -> None:
            registry = Registry(conn)

            def body() -> None:
                if t.live_oid is not None:
                    state = held_state(registry, t.live_oid, closure.state)  # type: ignore[union-attr]
                    rename(conn, t.db, undone, op.res)
                    registry.add_copy(t.live_oid, undone, t.db, "undone", state)
                rename(conn, prev.name, t.db, op.res)
                registry.forget_copy(prev.oid)

            started = time.monotonic()
            in_transaction_retrying(conn, op, [t.db, prev.name], body)
            op.res.pgbouncer_window_ms["rename"] = int((time.monotonic() - started) * 1000)
            pause_point("rolled-back")  # renamed, not yet reopened: the guard's moment
            back.open(conn, t.db, prev.block_state)

        def report() -> None:
            op.res.diff = {
                "before": {"marker": op.res.marker_before},
                "after": {"marker": op.registry.marker(prev.oid)},
            }
            kept = f'the replaced one is kept as "{undone}"' if t.live_oid is not None else "nothing was replaced"
            op.res.log.append(f'rolled back: "{t.db}" is again the copy from before the restore; {kept}')
            if t.live_oid is not None:
                logical.finish(undone)
                follow_standbys(op, undone)

        text = pause_text(op) + f'close and clear "{t.db}", rename it to "{undone}", ' if t.live_oid is not None else ""
        planned = planned_prune(t, "undone", undone) if t.live_oid is not None else []
        return [
            Step(
                "switch",
                text
                + f'rename "{prev.name}" to "{t.db}" and reopen it'
                + (logical.text() if t.live_oid is not None else "")
                + (standby_text(op) if t.live_oid is not None else ""),
                lambda: (run(), report()),
            ),
            *prune(t, "undone", op.req.keep_previous, planned),
        ]


class Abort:
    """phase=abort: drop the staged copy of a set that will not be switched."""

    def steps(self, op: Operation) -> list[Step]:
        t = Target(op)
        if t.staging_oid is None:
            return []
        return [drop_leftover(t, f'staged copy; "{t.db}" is not touched')]


class SwitchStaged:
    """phase=switch: put the copy staged earlier in place (nothing when the live one already holds src)."""

    def steps(self, op: Operation) -> list[Step]:
        t, res = Target(op), op.res
        res.marker_before = op.registry.marker(t.live_oid)
        staged = op.registry.marker(t.staging_oid)
        if op.req.src:
            with DumpSource(op.req.src) as dump:
                res.sha256 = dump_sha256(op, dump, staged, res.marker_before)
        if t.staging_oid is None:
            if op.req.src and res.marker_before and res.marker_before["sha256"] == res.sha256:
                res.log.append(f'"{t.db}" already holds this dump: nothing to switch')
                return []
            raise PgOpsError(f'nothing is staged for "{t.db}" ("{t.staging}" does not exist): run phase=stage first')
        if staged is None or (op.req.src and staged["sha256"] != res.sha256):
            raise PgOpsError(f'"{t.staging}" does not hold a verified copy of {op.req.src or "a dump"}: '
                             "run phase=stage again")  # fmt: skip
        res.diff = {"before": {"marker": res.marker_before}, "after": {"marker": staged}}
        t.preflight().raise_if_any()
        if t.live_oid is None:
            return [Step("switch", f'rename "{t.staging}" to "{t.db}"', lambda: _create_live(op, t))]
        return switch_steps(t)


STRATEGIES: dict[str, type[DumpRestore]] = {cls.name: cls for cls in (Swap, Replace)}


def plan_for(op: Operation) -> list[Step]:
    """The steps of the request: rollback, a phase of a set, or a strategy."""
    req = op.req
    if req.rollback:
        return Rollback().steps(op)
    if req.phase == "abort":
        return Abort().steps(op)
    if req.phase == "switch":
        return SwitchStaged().steps(op)
    if req.phase == "close":
        return close_steps(op, record_clear)
    if req.phase == "open":
        return open_steps(op)
    return STRATEGIES[req.strategy]().steps(op)


def record_outcome(op: Operation) -> None:
    """The record of the live database once the steps ran."""
    op.res.marker_after = op.registry.marker(database_oid(op.conn, op.req.db))
    if op.res.diff and op.res.steps_done:
        op.res.diff["after"]["marker"] = op.res.marker_after
