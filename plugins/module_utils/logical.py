# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Logical replication around the switch: subscriptions handed over, logical slots recreated.

A rename leaves a database's subscriptions and logical replication slots with the old copy.

Subscriptions (logical_subscriptions=hand_over): the remote slot a subscription streams from is
handed over to the copy that becomes live. Before the switch, the live copy's subscriptions are
disabled (we wait for their workers to exit) and detached from their slots (SET (slot_name = NONE));
after it, the new live copy's subscriptions of the same names (pg_dump creates them disabled, with
connect = false) get those slots and are enabled where the live ones were, and learn the publication's
tables (REFRESH PUBLICATION WITH (copy_data = false)): they apply what the publisher writes from the
moment the live copy stopped, on top of the restored data. A failure before the
switch gives the slots back. The replaced copy keeps its subscriptions disabled and without slot,
so dropping it later touches nothing remote.

Logical slots (logical_slots=recreate): after the switch each slot of the old copy is dropped (its
consumer's walsender ended first) and created again, same name, plugin and two_phase, on the copy
that is live now. The new slot starts at the current WAL position: what the old copy wrote and the
consumer had not read yet is lost, and the restored data itself is not sent (the consumer must
resynchronise, e.g. copy the tables again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    OBJECT_IN_USE,
    QUERY_CANCELED,
    ConnParams,
    PgOpsError,
    ServerInfo,
    connect,
    database_oid,
    ident,
    one_line,
    psycopg,
    sql,
)

SUBSCRIPTION_CHOICES = ("refuse", "hand_over")
SLOT_CHOICES = ("refuse", "recreate")
POLL_SECONDS = 0.02


def logical_argument_spec() -> dict[str, dict[str, Any]]:
    """pg_restore_db's logical replication options (documented in the module)."""
    return dict(
        logical_subscriptions=dict(type="str", default="refuse", choices=list(SUBSCRIPTION_CHOICES)),
        logical_slots=dict(type="str", default="refuse", choices=list(SLOT_CHOICES)),
    )


@dataclass(frozen=True)
class Subscription:
    name: str
    enabled: bool
    slot: str | None


@dataclass(frozen=True)
class Slot:
    name: str
    plugin: str
    two_phase: bool
    active_pid: int | None


def subscriptions_of(conn: Any, oid: int) -> list[Subscription]:
    """The subscriptions of a database (pg_subscription is shared: read from any database)."""
    rows = conn.execute(
        "SELECT subname, subenabled, subslotname FROM pg_catalog.pg_subscription WHERE subdbid = %s ORDER BY 1", (oid,)
    ).fetchall()
    return [Subscription(str(n), bool(e), None if s is None else str(s)) for n, e, s in rows]


def slots_of(conn: Any, info: ServerInfo, db: str) -> list[Slot]:
    two_phase = "two_phase" if info.version_num >= 140000 else "false"
    rows = conn.execute(
        f"SELECT slot_name, plugin, {two_phase}, active_pid FROM pg_catalog.pg_replication_slots "
        "WHERE database = %s AND slot_type = 'logical' ORDER BY 1",
        (db,),
    ).fetchall()
    return [Slot(str(n), str(p), bool(t), a) for n, p, t, a in rows]


def problems(conn: Any, info: ServerInfo, db: str, subscriptions: str, slots: str) -> list[str]:
    """What keeps the switch from handling the live database's logical replication as told (check mode too)."""
    if info.version_num < 100000:
        return []
    found: list[str] = []
    oid = database_oid(conn, db)
    if oid is None:
        return []
    enabled = [s.name for s in subscriptions_of(conn, oid) if s.enabled]
    if enabled and subscriptions == "refuse":
        found.append(
            f'"{db}" has enabled subscriptions {", ".join(enabled)}: the switch would leave them streaming into the '
            "old copy. Set logical_subscriptions=hand_over to hand their slots to the restored copy (its "
            "subscriptions of the same names, from a dump made by a superuser), or disable them first "
            "(ALTER SUBSCRIPTION … DISABLE)"
        )
    elif enabled and not info.is_superuser:
        found.append("logical_subscriptions=hand_over alters the subscriptions of both copies: log in as a superuser")
    names = [s.name for s in slots_of(conn, info, db)]
    if names and slots == "refuse":
        found.append(
            f'"{db}" has logical replication slots {", ".join(names)}: they would stay with the old copy and keep it '
            "from being dropped. Set logical_slots=recreate to drop them and create them again on the restored "
            "copy (their consumers lose what they had not read yet and must copy the restored data again), or drop "
            "them yourself (SELECT pg_drop_replication_slot('<name>'))"
        )
    elif names and not (info.is_superuser or _has_replication(conn)):
        found.append(
            f'logical_slots=recreate creates and drops replication slots: the login role "{info.current_user}" '
            "needs REPLICATION (or superuser)"
        )
    return found


def _has_replication(conn: Any) -> bool:
    return bool(
        conn.execute("SELECT rolreplication FROM pg_catalog.pg_roles WHERE rolname = current_user").fetchone()[0]
    )


@dataclass
class HandOver:
    """logical_subscriptions=hand_over: the live copy's subscription slots go to the copy that becomes live."""

    params: ConnParams
    db: str  # the live database's name (before and after the switch)
    timeout: float
    taken: list[Subscription] = field(default_factory=list)  # detached from the live copy, to hand over
    log: list[str] = field(default_factory=list)
    report: list[dict[str, Any]] = field(default_factory=list)

    def prepare(self, maintenance: Any, incoming_oid: int) -> None:
        """Before the switch: check the incoming copy has the subscriptions, then disable and detach the live ones."""
        live_oid = database_oid(maintenance, self.db)
        live = subscriptions_of(maintenance, live_oid) if live_oid is not None else []
        if not live:
            return
        incoming = {s.name for s in subscriptions_of(maintenance, incoming_oid)}
        missing = [s.name for s in live if s.name not in incoming and (s.enabled or s.slot)]
        if missing:
            raise PgOpsError(
                f"the restored copy has no subscription {', '.join(missing)} to hand over to (pg_dump writes "
                "subscriptions only when run by a superuser): dump as a superuser, or set logical_subscriptions=refuse "
                "and disable them first",
                sqlstate=OBJECT_IN_USE,
            )
        with connect(self.params.with_db(self.db)) as conn:
            for s in live:
                if not (s.enabled or s.slot):
                    continue
                if s.enabled:
                    _alter(conn, s.name, "DISABLE")
                self.taken.append(s)
                _wait_workers_gone(conn, s.name, self.timeout)
                if s.slot:
                    _alter(conn, s.name, "SET (slot_name = NONE)")
        self.log.append(f'switch: disabled the subscriptions of "{self.db}" and detached their slots '
                        f"({', '.join(s.name for s in self.taken)}) to hand them over")  # fmt: skip

    def give_back(self) -> None:
        """The switch failed: the live copy gets its slots back and streams again."""
        if not self.taken:
            return
        try:
            with connect(self.params.with_db(self.db)) as conn:
                for s in self.taken:
                    _take_slot(conn, s)
            self.taken = []
        except (PgOpsError, psycopg.Error) as exc:
            self.log.append(f'switch: could not give the subscriptions back to "{self.db}": {one_line(exc)}; run '
                            "ALTER SUBSCRIPTION … SET (slot_name = '…') and … ENABLE there")  # fmt: skip

    def finish(self) -> None:
        """After the switch: the copy now live takes the slots; subscriptions that were enabled are enabled."""
        if not self.taken:
            return
        done = []
        try:
            with connect(self.params.with_db(self.db)) as conn:
                for s in self.taken:
                    _take_slot(conn, s)
                    if s.enabled:
                        # made with connect = false, it knows no table yet: the publication's tables, as they are
                        _alter(conn, s.name, "REFRESH PUBLICATION WITH (copy_data = false)")
                    done.append(s)
                    self.report.append({"name": s.name, "slot": s.slot or "", "enabled": s.enabled})
        except (PgOpsError, psycopg.Error) as exc:
            left = ", ".join(s.name for s in self.taken if s not in done)
            raise PgOpsError(
                f'switched "{self.db}", but its subscriptions {left} did not take over their slots ({one_line(exc)}): '
                f"in \"{self.db}\" run ALTER SUBSCRIPTION <name> SET (slot_name = '<slot>') and ALTER SUBSCRIPTION "
                "<name> ENABLE"
            ) from exc
        self.log.append(f'switch: the subscriptions of the restored "{self.db}" took over their slots '
                        f"({', '.join(s.name for s in done)}); enabled: "
                        f"{', '.join(s.name for s in done if s.enabled) or 'none'}")  # fmt: skip


@dataclass
class Recreate:
    """logical_slots=recreate: after the switch, the old copy's logical slots are made again on the live one."""

    params: ConnParams
    info: ServerInfo
    db: str
    timeout: float
    slots: list[Slot] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    report: list[dict[str, Any]] = field(default_factory=list)

    def prepare(self, maintenance: Any) -> None:
        self.slots = slots_of(maintenance, self.info, self.db)

    def finish(self, maintenance: Any, old_db: str) -> None:
        if not self.slots:
            return
        try:
            for s in self.slots:
                _drop_slot(maintenance, s.name, self.timeout)
            with connect(self.params.with_db(self.db)) as conn:
                for s in self.slots:
                    args = [sql.Literal(s.name), sql.Literal(s.plugin)]
                    if self.info.version_num >= 140000:
                        args += [sql.Literal(False), sql.Literal(s.two_phase)]
                    row = conn.execute(
                        sql.SQL("SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot({})").format(
                            sql.SQL(", ").join(args)
                        )
                    ).fetchone()
                    self.report.append({"name": s.name, "plugin": s.plugin, "lsn": row[0]})
        except (PgOpsError, psycopg.Error) as exc:
            made = {r["name"] for r in self.report}
            left = ", ".join(s.name for s in self.slots if s.name not in made)
            raise PgOpsError(
                f'switched "{self.db}", but its logical slots {left} were not recreated ({one_line(exc)}): in '
                f"\"{self.db}\" run SELECT pg_create_logical_replication_slot('<name>', '<plugin>') (and drop what is "
                f'left of them on "{old_db}")'
            ) from exc
        names = ", ".join(r["name"] for r in self.report)
        self.log.append(f'switch: recreated the logical slots {names} on the restored "{self.db}" (dropped from '
                        f'"{old_db}"); their consumers read from the switch on')  # fmt: skip


def _take_slot(conn: Any, s: Subscription) -> None:
    """The subscription s (of the database conn is in) takes its slot again, and is enabled if it was."""
    if s.slot:
        _set_slot(conn, s.name, s.slot)
    if s.enabled:
        _alter(conn, s.name, "ENABLE")


def _alter(conn: Any, name: str, what: str) -> None:
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} " + what).format(ident(name)))


def _set_slot(conn: Any, name: str, slot: str) -> None:
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = {})").format(ident(name), sql.Literal(slot)))


def _wait_workers_gone(conn: Any, name: str, timeout: float) -> None:
    """A disabled subscription's workers exit on their own; the slot may be detached once they have."""
    deadline = time.monotonic() + timeout
    while conn.execute(
        "SELECT count(*) FROM pg_catalog.pg_stat_subscription WHERE subname = %s AND pid IS NOT NULL", (name,)
    ).fetchone()[0]:
        if time.monotonic() > deadline:
            raise PgOpsError(f"the workers of subscription {name} did not exit within {timeout:g}s of DISABLE",
                             sqlstate=QUERY_CANCELED)  # fmt: skip
        time.sleep(POLL_SECONDS)


def _drop_slot(conn: Any, name: str, timeout: float) -> None:
    """Drop a logical slot, ending the walsender that streams from it first."""
    deadline = time.monotonic() + timeout
    while True:
        pid = conn.execute(
            "SELECT active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = %s", (name,)
        ).fetchone()
        if pid is None:
            return
        if pid[0] is None:
            try:
                conn.execute("SELECT pg_catalog.pg_drop_replication_slot(%s)", (name,))
                return
            except psycopg.errors.ObjectInUse:
                pass  # the consumer came back in between
        else:
            conn.execute("SELECT pg_catalog.pg_terminate_backend(%s)", (pid[0],))
        if time.monotonic() > deadline:
            raise PgOpsError(f"replication slot {name} stayed in use for {timeout:g}s", sqlstate=OBJECT_IN_USE)
        time.sleep(POLL_SECONDS)


def drop_subscriptions(params: ConnParams, maintenance: Any, db: str, timeout: float) -> list[str]:
    """Before a copy of ours is dropped: its subscriptions go, detached from their slots first so that no remote
    slot is dropped with them (the slot may be the one the live copy streams from). The copy is opened for this."""
    oid = database_oid(maintenance, db)
    subs = subscriptions_of(maintenance, oid) if oid is not None else []
    if not subs:
        return []
    maintenance.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(ident(db)))
    with connect(params.with_db(db)) as conn:
        for s in subs:
            if s.enabled:
                _alter(conn, s.name, "DISABLE")
                _wait_workers_gone(conn, s.name, timeout)
            if s.slot:
                _alter(conn, s.name, "SET (slot_name = NONE)")
            conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident(s.name)))
    return [s.name for s in subs]
