# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restoring a live database from a dump without ever risking the live data: request, result, entry.

The strategies (swap, replace, rollback and the phases of a set) are in strategies.py, each an
ordered list of steps walked by operation.Operation. pg_restore_db is a thin wrapper around
restore_database(); the web-triggered command calls it too.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import CHOICES as BLOCK_CHOICES
from ansible_collections.pgops.dbrestore.plugins.module_utils.keep import not_supported, parse_tables
from ansible_collections.pgops.dbrestore.plugins.module_utils.logical import SLOT_CHOICES, SUBSCRIPTION_CHOICES
from ansible_collections.pgops.dbrestore.plugins.module_utils.operation import Operation
from ansible_collections.pgops.dbrestore.plugins.module_utils.pooler import FALLBACKS as POOLER_FALLBACKS
from ansible_collections.pgops.dbrestore.plugins.module_utils.pooler import Pooler
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import ConnParams, PgOpsError, psycopg, sql_error
from ansible_collections.pgops.dbrestore.plugins.module_utils.registry import lock_holders
from ansible_collections.pgops.dbrestore.plugins.module_utils.restart import (
    FALLBACKS,
    RestartSpec,
    restart_spec_from_params,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.standbys import Standby, entry_problems
from ansible_collections.pgops.dbrestore.plugins.module_utils.strategies import (
    PHASES,
    STRATEGIES,
    plan_for,
    record_outcome,
)

# identity: a dump whose file identity is the recorded one is the recorded dump (not read); full: always hash it
CHECKSUM_CHOICES = ("identity", "full")
DEFAULT_JOBS = max(1, (os.cpu_count() or 2) // 2)  # half the host's CPUs: the live server keeps serving


@dataclass
class RestoreRequest:
    db: str
    src: str | None = None
    source: dict[str, Any] | None = None  # a database to stream from (pg_restore_db's source suboptions)
    strategy: str = "swap"
    rollback: bool = False
    owner: str | None = None
    template: str = "template0"
    encoding: str | None = None
    lc_collate: str | None = None
    lc_ctype: str | None = None
    jobs: int | None = None
    bindir: str | None = None
    tool_args: tuple[str, ...] = ()
    keep_previous: int = 1
    verify_query: str | None = None
    sanitize: tuple[str, ...] = ()
    analyze: bool = True
    force: bool = False
    lock_timeout: float = 0
    block_new_connections: str = "allow_connections"
    wait_timeout: float = 30
    fallback: str = "none"
    restart: RestartSpec | None = None
    phase: str = "all"
    pgbouncers: tuple[Pooler, ...] = ()  # paused around the switch (dicts of Pooler's fields are taken too)
    pgbouncer_pause_timeout: float = 10
    pgbouncer_fallback: str = "none"
    standbys: tuple[Standby, ...] = ()  # followed after the switch (dicts of Standby's fields are taken too)
    standby_timeout: float = 30
    discover_standbys: bool = False  # follow the standbys pg_stat_replication shows (standbys: how to reach them)
    logical_subscriptions: str = "refuse"  # or hand_over (logical.py)
    logical_slots: str = "refuse"  # or recreate (logical.py)
    verify_checksum: str = "identity"
    progress_dir: str | None = None  # where the progress file of the run is kept (progress.py); None: nowhere
    keep_tables: tuple[str, ...] = ()  # tables whose live rows the switch carries into the restored copy (keep.py)
    parallel_table_mb: int = 256  # tables of the live database this large load by several COPY sessions; 0: none

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> RestoreRequest:
        """From pg_restore_db's module parameters."""
        return cls(
            db=p["db"],
            src=os.path.abspath(p["src"]) if p["src"] else None,
            source=p.get("source"),
            strategy=p["strategy"],
            rollback=p["rollback"],
            owner=p["owner"],
            template=p["template"],
            encoding=p["encoding"],
            lc_collate=p["lc_collate"],
            lc_ctype=p["lc_ctype"],
            jobs=p["jobs"],
            bindir=p["bindir"],
            tool_args=tuple(p["tool_args"]),
            keep_previous=p["keep_previous"],
            verify_query=p["verify_query"],
            sanitize=tuple(p.get("sanitize") or ()),
            analyze=p["analyze"],
            force=p["force"],
            lock_timeout=p["lock_timeout"],
            block_new_connections=p["block_new_connections"],
            wait_timeout=p["wait_timeout"],
            fallback=p["fallback"],
            restart=restart_spec_from_params(p),
            phase=p["phase"],
            pgbouncers=tuple(Pooler.from_params(b, p["db"]) for b in p.get("pgbouncers") or ()),
            pgbouncer_pause_timeout=p.get("pgbouncer_pause_timeout", 10),
            pgbouncer_fallback=p.get("pgbouncer_fallback") or "none",
            standbys=tuple(Standby.from_params(s) for s in p.get("standbys") or ()),
            standby_timeout=p.get("standby_timeout", 30),
            discover_standbys=bool(p.get("discover_standbys")),
            logical_subscriptions=p.get("logical_subscriptions") or "refuse",
            logical_slots=p.get("logical_slots") or "refuse",
            verify_checksum=p.get("verify_checksum") or "identity",
            progress_dir=p.get("progress_dir"),
            keep_tables=tuple(p.get("keep_tables") or ()),
            parallel_table_mb=p.get("parallel_table_mb", 256),
        )

    def __post_init__(self) -> None:
        self.pgbouncers = tuple(b if isinstance(b, Pooler) else Pooler.from_params(b, self.db) for b in self.pgbouncers)
        self.standbys = tuple(s if isinstance(s, Standby) else Standby.from_params(s) for s in self.standbys)
        if self.standby_timeout <= 0:
            raise PgOpsError("standby_timeout must be more than 0 seconds")
        bad = entry_problems(self.standbys, self.discover_standbys)
        if bad:
            raise PgOpsError("; ".join(bad))
        if (self.standbys or self.discover_standbys) and self.strategy == "replace" and not self.rollback:
            raise PgOpsError(
                "standbys follows a swap's rename; strategy=replace drops the database, which ends the "
                "standbys' sessions itself: leave standbys out"
            )
        if self.pgbouncer_fallback not in POOLER_FALLBACKS:
            raise PgOpsError(
                f"pgbouncer_fallback must be one of {list(POOLER_FALLBACKS)}, not {self.pgbouncer_fallback!r}"
            )
        if self.pgbouncers and self.strategy == "replace" and not self.rollback:
            raise PgOpsError(
                "pgbouncers pauses PgBouncer around a swap's short switch; strategy=replace keeps the "
                "database away for the whole restore: use strategy=swap, or leave pgbouncers out"
            )
        if self.logical_subscriptions not in SUBSCRIPTION_CHOICES:
            raise PgOpsError(f"logical_subscriptions must be one of {list(SUBSCRIPTION_CHOICES)}, "
                             f"not {self.logical_subscriptions!r}")  # fmt: skip
        if self.logical_slots not in SLOT_CHOICES:
            raise PgOpsError(f"logical_slots must be one of {list(SLOT_CHOICES)}, not {self.logical_slots!r}")
        if self.pgbouncer_pause_timeout <= 0:
            raise PgOpsError("pgbouncer_pause_timeout must be more than 0 seconds")
        if self.strategy not in STRATEGIES:
            raise PgOpsError(f"strategy must be one of {list(STRATEGIES)}, not {self.strategy!r}")
        if self.phase not in PHASES:
            raise PgOpsError(f"phase must be one of {list(PHASES)}, not {self.phase!r}")
        if self.block_new_connections not in BLOCK_CHOICES:
            raise PgOpsError(
                f"block_new_connections must be one of {list(BLOCK_CHOICES)}, not {self.block_new_connections!r}"
            )
        if self.verify_checksum not in CHECKSUM_CHOICES:
            raise PgOpsError(f"verify_checksum must be one of {list(CHECKSUM_CHOICES)}, not {self.verify_checksum!r}")
        if self.fallback not in FALLBACKS:
            raise PgOpsError(f"fallback must be one of {list(FALLBACKS)}, not {self.fallback!r}")
        if self.fallback == "restart" and self.restart is None:
            raise PgOpsError(
                "fallback=restart needs restart_patroni_url, restart_service, restart_data_dir or restart_command"
            )
        if self.phase != "all" and (self.strategy != "swap" or self.rollback):
            raise PgOpsError(f"phase={self.phase} works with strategy=swap only, and not with rollback")
        if self.rollback and self.src:
            raise PgOpsError("rollback=true swaps the previous copy back and reads no dump: leave src out")
        if self.rollback and self.strategy != "swap":
            raise PgOpsError("rollback=true always swaps: leave strategy out")
        if self.source and (self.src or self.rollback or self.phase not in ("all", "stage")):
            raise PgOpsError("source (a database to stream from) replaces src, and goes with phase=all or phase=stage "
                             "only, not with rollback")  # fmt: skip
        if self.source and self.strategy != "swap":
            raise PgOpsError("a source database is streamed, so it cannot be read through before the live database is "
                             "dropped: use strategy=swap (the default) with source")  # fmt: skip
        if not self.rollback and not self.src and not self.source and self.phase in ("all", "stage"):
            raise PgOpsError("src (the dump to restore) or source (a database to stream from) is required unless "
                             "rollback=true")  # fmt: skip
        if self.sanitize and (self.rollback or self.phase not in ("all", "stage")):
            raise PgOpsError("sanitize scripts run while a copy is staged: give them with phase=all or phase=stage, "
                             "not with rollback or phase=switch/abort")  # fmt: skip
        if self.keep_previous < 0:
            raise PgOpsError("keep_previous must be 0 or more")
        if self.parallel_table_mb < 0:
            raise PgOpsError("parallel_table_mb must be 0 (never split a table) or more")
        if self.jobs is not None and self.jobs < 1:
            raise PgOpsError("jobs must be 1 or more")
        if self.keep_tables:
            parse_tables(self.keep_tables)  # names it can read
            if self.strategy != "swap" or self.rollback or self.phase not in ("all", "switch", "stage"):
                raise not_supported("rollback" if self.rollback else self.strategy)

    @property
    def load_jobs(self) -> int:
        return self.jobs or DEFAULT_JOBS


@dataclass
class RestoreResult:
    changed: bool = False
    db: str = ""
    strategy: str = ""
    phase: str = "all"
    format: str = ""
    sha256: str = ""
    checksum_by: str = ""  # identity: taken from our record (the dump was not read); full: the dump was hashed
    jobs: int = 0  # the jobs this run loads with (jobs, or half the CPUs of the host)
    # check mode: backends of another restore of this database holding its lock now (a real run would wait
    # lock_timeout for them, then fail)
    busy_pids: list[int] = field(default_factory=list)
    server_version: str = ""
    marker_before: dict | None = None
    marker_after: dict | None = None
    staging_db: str = ""
    staged: bool = False  # phase=stage: a verified copy waits for phase=switch
    live_size_bytes: int = 0
    data_directory: str = ""  # empty when the login role may not see it
    previous_db: str = ""
    created: list[str] = field(default_factory=list)
    renamed: list[str] = field(default_factory=list)  # "old -> new"
    dropped: list[str] = field(default_factory=list)
    dropping: list[str] = field(default_factory=list)  # old copies a detached session drops after we return
    terminated: list[dict] = field(default_factory=list)
    restarted: bool = False
    switch_window_ms: int = 0
    pgbouncer_pause_ms: int = 0  # PAUSE sent to RESUME done: how long clients behind PgBouncer waited at most
    pgbouncer_window_ms: dict[str, int] = field(default_factory=dict)  # where the pause went, per step
    pgbouncers: list[dict] = field(default_factory=list)
    logical: dict[str, list] = field(default_factory=dict)  # subscriptions handed over, slots recreated
    standbys: list[dict] = field(default_factory=list)  # per standby: replayed, lag_bytes, lag_ms, sessions_ended
    switched_at: float = 0.0  # UNIX time the renames committed (0: no switch), for the spread of a set
    closed_at: float = 0.0  # phase=close: UNIX time the set's barrier closed here (0: not closed)
    opened_at: float = 0.0  # phase=open: UNIX time it reopened here (0: nothing to reopen)
    kept_tables: dict[str, Any] = field(default_factory=dict)  # keep_tables: rows carried per table, ms in the window
    phases_ms: dict[str, int] = field(default_factory=dict)
    stripped_statements: list[str] = field(default_factory=list)
    sanitized: list[dict] = field(default_factory=list)  # name, sha256, ms of each sanitize script that ran
    rollback: dict[str, Any] = field(default_factory=dict)
    rollback_sql: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    steps_done: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    diff: dict[str, Any] = field(default_factory=dict)

    @property
    def terminated_count(self) -> int:
        return len(self.terminated)

    def has_effects(self) -> bool:
        """Whether anything is different now: a database made, renamed or dropped, a session ended."""
        return bool(self.created or self.renamed or self.dropped or self.dropping or self.terminated or self.restarted)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["terminated_count"] = self.terminated_count
        return data


def restore_database(params: ConnParams, req: RestoreRequest, *, check_mode: bool = False) -> RestoreResult:
    """Run the request's strategy; a failure raises PgOpsError carrying the partial result."""
    res = RestoreResult(db=req.db, strategy="rollback" if req.rollback else req.strategy, phase=req.phase,
                        jobs=req.load_jobs)  # fmt: skip
    op: Operation | None = None
    try:
        op = Operation(params, req, res, check_mode)
        if check_mode:
            res.busy_pids = lock_holders(op.conn, req.db)
        else:
            with op.phase("lock"):
                res.warnings += op.conn.lock(req.lock_timeout)
            op.progress.start()
        op.walk(plan_for(op))
        if not check_mode:
            record_outcome(op)
        return res
    except PgOpsError as exc:
        _attach(exc, res, op)
        raise
    except psycopg.Error as exc:  # a statement outside the expected ones; keep its SQLSTATE
        err = sql_error(exc, "PostgreSQL error")
        _attach(err, res, op)
        raise err from exc
    except BaseException as exc:  # killed, or a bug: the progress file must not say done
        if op is not None:
            op.finish(error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if op is not None:
            op.finish()


def _attach(exc: PgOpsError, res: RestoreResult, op: Operation | None) -> None:
    """Put what was done so far on the error: the module reports it, changed=true if anything changed."""
    if op is not None:
        op.finish(error=str(exc))
    exc.details.update(res.as_dict())
