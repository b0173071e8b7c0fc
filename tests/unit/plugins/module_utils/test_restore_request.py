"""restore.py without a server: what a request accepts and defaults to, and what a result reports.

(Named test_restore_request.py: tests/integration/test_restore.py has the module name test_restore.)
"""

from __future__ import annotations

import os

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.restart import RestartSpec
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import (
    DEFAULT_JOBS,
    RestoreRequest,
    RestoreResult,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.strategies import PHASES, STRATEGIES


def test_defaults():
    req = RestoreRequest(db="hoge_db", src="/d.dump")
    assert req.strategy == "swap" and req.analyze is True and req.block_new_connections == "allow_connections"
    assert req.tool_args == () and req.keep_previous == 1 and req.phase == "all"
    assert req.jobs is None and req.load_jobs == DEFAULT_JOBS == max(1, (os.cpu_count() or 2) // 2)
    assert RestoreRequest(db="x", src="/d", jobs=3).load_jobs == 3
    assert set(STRATEGIES) == {"swap", "replace"} and PHASES == ("all", "stage", "close", "switch", "open", "abort")


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(src="/d", strategy="copy"), r"strategy must be one of \['swap', 'replace'\], not 'copy'"),
        (dict(src="/d", phase="later"), r"phase must be one of \['all', 'stage', 'close', 'switch', 'open', 'abort'\]"),
        (dict(src="/d", block_new_connections="none"), r"block_new_connections must be one of \['allow_connections'"),
        (dict(src="/d", fallback="restart"), "fallback=restart needs restart_patroni_url, restart_service"),
        (dict(src="/d", fallback="pray"), r"fallback must be one of \['none', 'restart'\]"),
        (dict(src="/d", phase="stage", strategy="replace"), "phase=stage works with strategy=swap only"),
        (dict(phase="switch", rollback=True), "phase=switch works with strategy=swap only, and not with rollback"),
        (dict(src="/d", rollback=True), "rollback=true swaps the previous copy back and reads no dump"),
        (dict(rollback=True, strategy="replace"), "rollback=true always swaps: leave strategy out"),
        (dict(), r"src \(the dump to restore\) or source \(a database to stream from\) is required unless rollback"),
        (dict(phase="stage"), r"src \(the dump to restore\) or source \(a database to stream from\) is required"),
        (dict(src="/d", source={"db": "p"}), "source .a database to stream from. replaces src"),
        (dict(source={"db": "p"}, phase="switch"), "goes with phase=all or phase=stage only"),
        (dict(source={"db": "p"}, strategy="replace"), "use strategy=swap .the default. with source"),
        (dict(src="/d", sanitize=("x.sql",), phase="switch"), "sanitize scripts run while a copy is staged"),
        (dict(sanitize=("x.sql",), rollback=True), "sanitize scripts run while a copy is staged"),
        (dict(src="/d", keep_previous=-1), "keep_previous must be 0 or more"),
        (dict(src="/d", jobs=0), "jobs must be 1 or more"),
    ],
)
def test_refused_requests(kw: dict, msg: str):
    with pytest.raises(PgOpsError, match=msg):
        RestoreRequest(db="hoge_db", **kw)


def test_accepted_without_src():
    RestoreRequest(db="x", rollback=True)
    RestoreRequest(db="x", phase="switch")  # the staged copy is what is switched
    RestoreRequest(db="x", phase="abort")
    RestoreRequest(db="x", src="/d", fallback="restart", restart=RestartSpec(service="postgresql"))


def test_from_module_params_renamed_options():
    params = {
        "db": "hoge_db", "src": "rel/dump.custom", "strategy": "swap", "rollback": False, "owner": None,
        "template": "template0", "encoding": None, "lc_collate": None, "lc_ctype": None, "jobs": None,
        "bindir": None, "tool_args": ["--no-owner"], "keep_previous": 2, "verify_query": "SELECT true",
        "analyze": True, "force": False, "lock_timeout": 0.0, "block_new_connections": "revoke_connect",
        "wait_timeout": 30.0, "fallback": "none", "restart_service": None, "restart_pg_ctl": "pg_ctl",
        "restart_data_dir": None, "restart_command": [], "restart_become_user": None, "restart_sudo": False,
        "restart_timeout": 120, "phase": "all", "verify_checksum": "full", "progress_dir": None,
        "parallel_table_mb": 0, "keep_tables": ["sessions"],
    }  # fmt: skip
    req = RestoreRequest.from_params(params)
    assert req.verify_checksum == "full" and req.progress_dir is None and req.parallel_table_mb == 0
    assert req.src == os.path.abspath("rel/dump.custom") and req.tool_args == ("--no-owner",)
    assert req.block_new_connections == "revoke_connect" and req.keep_previous == 2 and req.restart is None
    assert req.keep_tables == ("sessions",)


def test_result_reports_counts_and_effects():
    res = RestoreResult()
    assert not res.has_effects() and res.terminated_count == 0
    res.terminated = [{"pid": 1}, {"pid": 2}]
    assert res.has_effects() and res.terminated_count == 2
    data = res.as_dict()
    assert data["terminated_count"] == 2 and data["terminated"] == [{"pid": 1}, {"pid": 2}]
    for field in ("created", "renamed", "dropped", "steps_done", "plan", "log", "warnings", "phases_ms"):
        assert field in data
    for made in (dict(created=["x"]), dict(renamed=["a -> b"]), dict(dropped=["x"]), dict(restarted=True)):
        assert RestoreResult(**made).has_effects()
