# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The barrier around the switch of a set (shards, on one host or several): nobody sees two restores.

phase=close, on every host before any switch: the live database and its staged copy are closed to
new connections (block_new_connections; what each method took is recorded by OID first) and every
session on them is ended, so a connection opened to an old shard is gone before any new shard is
reachable. phase=switch then renames behind the closed doors (the restored copy stays closed, and
the copy switched out keeps the state recorded before the close, so a later rollback reopens it).
phase=open, on every host once all switched (or all rolled back): each database of ours that holds
a recorded block gets back exactly what was taken.
"""

from __future__ import annotations

import time
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import (
    BlockMethod,
    BlockState,
    best_method,
    block_method,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.copies import staging_name
from ansible_collections.pgops.dbrestore.plugins.module_utils.operation import Operation, Step
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError, database_oid
from ansible_collections.pgops.dbrestore.plugins.module_utils.registry import Registry
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import ClearRequest, ClearResult, clear_sessions


def held_state(registry: Registry, oid: int | None, found: BlockState) -> BlockState:
    """The state to record for a copy switched out (or rolled away): the one phase=close recorded, if it closed it.

    The record moves onto the copy (its block is cleared), inside the caller's transaction.
    """
    if not found.closed or oid is None:
        return found
    recorded = registry.block(oid)
    if recorded is None:
        return found
    registry.clear_block(oid)
    return recorded


def _names(op: Operation) -> list[tuple[str, int]]:
    """The staged copy first (nobody is on it), then the live database; those that exist, with their OIDs."""
    found = []
    for name in (staging_name(op.req.db), op.req.db):
        oid = database_oid(op.conn, name)
        if oid is not None:
            found.append((name, oid))
    return found


def close_steps(op: Operation, record_clear: Any) -> list[Step]:
    """phase=close: close the live database and its staged copy, end their sessions (record_clear: into res)."""
    names = _names(op)
    method = best_method(op.info, op.req.block_new_connections)
    if not names:
        return []
    listed = " and ".join(f'"{n}"' for n, _oid in names)

    def run() -> None:
        op.res.closed_at = time.time()
        taken: list[tuple[str, int, BlockState]] = []
        try:
            for name, oid in names:
                state = method.snapshot(op.conn, name)
                if not state.closed:
                    op.registry.set_block(oid, name, state)  # first: phase=open gives back exactly this
                    taken.append((name, oid, state))
                request = ClearRequest(db=name, state="blocked", block=method.name, wait_timeout=op.req.wait_timeout,
                                       fallback=op.req.fallback, restart=op.req.restart,
                                       record_block=False)  # fmt: skip
                try:
                    cleared: ClearResult = clear_sessions(op.params, request)
                except PgOpsError as exc:
                    op.res.terminated += exc.details.get("terminated", [])
                    raise
                record_clear(op, cleared)
        except BaseException:
            for name, oid, state in reversed(taken):  # clear_sessions reopened the one that failed
                _give_back(op, method, name, oid, state)
            raise
        op.res.log.append(f"closed {listed} until every host of the set has switched (phase=open reopens them)")

    text = (f'close {listed} to new connections ({method.name}) and end their sessions, until phase=open '
            "(every host of the set closes before any switches)")  # fmt: skip
    return [Step("close", text, run)]


def open_steps(op: Operation) -> list[Step]:
    """phase=open: give back what phase=close took on the live database and its staged copy (by OID, as recorded)."""
    held = [(name, oid, op.registry.block(oid)) for name, oid in _names(op)]
    held = [(name, oid, state) for name, oid, state in held if state is not None]
    if not held:
        return []

    def run() -> None:
        for name, oid, state in held:
            _give_back(op, block_method(state.method), name, oid, state)  # type: ignore[union-attr]
            op.res.log.append(f'reopened "{name}" to new connections')
        op.res.opened_at = time.time()

    listed = " and ".join(f'"{n}"' for n, _oid, _s in held)
    return [Step("open", f"reopen {listed} to new connections as they were before phase=close", run)]


def _give_back(op: Operation, method: BlockMethod, name: str, oid: int, state: BlockState) -> None:
    if method.snapshot(op.conn, name).closed:
        method.open(op.conn, name, state)
    op.registry.clear_block(oid)
