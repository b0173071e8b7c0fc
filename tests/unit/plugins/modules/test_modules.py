"""The modules' own layer: argument handling and clean failures, before any server is reached."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.pgops.dbrestore.plugins.module_utils.restart import RestartSpec
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreResult
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import ClearRequest, ClearResult, SessionFilter
from ansible_collections.pgops.dbrestore.plugins.modules import pg_restore_db, pg_terminate_connections

# a port nothing listens on: any attempt to connect fails at once
NOWHERE = {"login_host": "127.0.0.1", "login_port": 1, "login_password": "s3cret-value"}


def run(module, args: dict, capsys: pytest.CaptureFixture) -> dict:
    with patch_module_args(args), pytest.raises(SystemExit, match=r"^[01]$"):
        module.main()
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("module", "args", "msg"),
    [
        (pg_terminate_connections, {}, "missing required arguments: db"),
        (pg_terminate_connections, {"db": "x", "state": "gone"}, "value of state must be one of"),
        (pg_terminate_connections, {"db": "x", "state": "blocked"}, "state=blocked needs block_new_connections"),
        (pg_terminate_connections, {"db": "x", "fallback": "restart"}, "fallback=restart needs"),
        (pg_terminate_connections, {"db": "x", "session_states": ["asleep"]}, "value of session_states must be"),
        (pg_restore_db, {"db": "x"}, "src (the dump to restore) or source (a database to stream from) is required"),
        (pg_restore_db, {"db": "x", "src": "/d", "phase": "stage", "strategy": "replace"}, "strategy=swap only"),
        (pg_restore_db, {"db": "x", "src": "/d", "keep_previous": -1}, "keep_previous must be 0 or more"),
    ],
)
def test_bad_arguments_fail_before_connecting(module, args: dict, msg: str, capsys: pytest.CaptureFixture):
    result = run(module, {**NOWHERE, **args}, capsys)
    assert result["failed"] and msg in result["msg"], result["msg"]
    assert not result.get("changed")


@pytest.mark.parametrize("module", [pg_terminate_connections, pg_restore_db])
def test_unreachable_server_is_one_clear_line_and_hides_the_password(module, capsys, tmp_path):
    dump = tmp_path / "x.sql"
    dump.write_text("SELECT 1;\n")
    result = run(module, {**NOWHERE, "db": "hoge_db", "src": str(dump)} if module is pg_restore_db
                 else {**NOWHERE, "db": "hoge_db"}, capsys)  # fmt: skip
    assert result["failed"] and result["msg"].startswith("cannot connect to PostgreSQL as postgres@127.0.0.1:1/")
    assert "\n" not in result["msg"] and "s3cret-value" not in json.dumps(result)


TERMINATE_PARAMS = {
    "db": "hoge_db", "state": "blocked", "block_new_connections": "revoke_connect", "block_roles": ["ignored"],
    "users": ["app"], "exclude_users": ["admin"], "application_names": ["unicorn*"],
    "exclude_application_names": ["psql*"], "client_addrs": ["10.0.0.0/8", "local"],
    "session_states": ["idle", "idle in transaction"], "cancel_first": True, "wait_timeout": 5.0,
    "fallback": "restart", "restart_service": "postgresql", "restart_pg_ctl": "pg_ctl", "restart_data_dir": None,
    "restart_command": [], "restart_become_user": None, "restart_sudo": True, "restart_timeout": 60,
}  # fmt: skip


def check_terminate_request(req: ClearRequest) -> None:
    """Every filter got its own value, so a filter wired to the wrong field cannot pass."""
    assert req.db == "hoge_db" and req.state == "blocked" and req.block == "revoke_connect"
    assert req.session_filter == SessionFilter(
        users=("app",),
        exclude_users=("admin",),
        application_names=("unicorn*",),
        exclude_application_names=("psql*",),
        client_addrs=("10.0.0.0/8", "local"),
        states=("idle", "idle in transaction"),
    )
    assert req.cancel_first and req.wait_timeout == 5.0 and req.fallback == "restart" and req.record_block
    assert req.restart == RestartSpec(service="postgresql", pg_ctl="pg_ctl", use_sudo=True, timeout=60)


def test_terminate_request_mapping():
    check_terminate_request(ClearRequest.from_params(TERMINATE_PARAMS))


def test_terminate_module_passes_every_option_through(monkeypatch: pytest.MonkeyPatch, capsys):
    """The module's own argument spec, aliases and defaults included, reaches the request unchanged."""
    seen = []

    def record(params, req, check_mode=False):
        seen.append((params, req, check_mode))
        return ClearResult(changed=False)

    monkeypatch.setattr(pg_terminate_connections, "clear_sessions", record)
    args = {**NOWHERE, **TERMINATE_PARAMS, "name": TERMINATE_PARAMS["db"], "_ansible_check_mode": True}
    del args["db"], args["restart_pg_ctl"], args["restart_data_dir"], args["restart_become_user"]
    result = run(pg_terminate_connections, args, capsys)
    assert not result.get("failed"), result.get("msg")
    [(params, req, check_mode)] = seen
    check_terminate_request(req)
    assert check_mode and params.login_port == 1 and params.login_password == "s3cret-value"
    assert result["terminated_count"] == 0 and "count" not in result
    deprecations = json.dumps(result.get("deprecations", []))
    assert "Param 'block_roles' is deprecated" in deprecations, result
    # the module's own result must not use what Ansible deprecates (warnings go through module.warn)
    assert "Passing `warnings` to `exit_json` or `fail_json` is deprecated" not in deprecations


def test_restore_module_passes_every_option_through(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path):
    seen = []

    def record(params, req, check_mode=False):
        seen.append(req)
        return RestoreResult(db=req.db)

    monkeypatch.setattr(pg_restore_db, "restore_database", record)
    args = {**NOWHERE, "db": "hoge_db", "src": str(tmp_path / "d.dump"), "restore_args": ["--no-owner", "-x"],
            "block_new_connections": "revoke_connect", "keep_previous": 3, "verify_query": "SELECT true",
            "force": True, "jobs": 2, "lock_timeout": 4, "wait_timeout": 6}  # fmt: skip
    result = run(pg_restore_db, args, capsys)
    assert not result.get("failed"), result.get("msg")
    [req] = seen
    assert req.tool_args == ("--no-owner", "-x") and req.src == str(tmp_path / "d.dump")
    assert req.block_new_connections == "revoke_connect" and req.keep_previous == 3 and req.force
    assert req.verify_query == "SELECT true" and req.jobs == 2 and req.lock_timeout == 4 and req.wait_timeout == 6
    assert req.analyze is True and req.strategy == "swap" and req.phase == "all" and req.restart is None
    assert result["terminated"] == [] and result["terminated_count"] == 0
    assert "Passing `warnings` to `exit_json` or `fail_json` is deprecated" not in json.dumps(result)
