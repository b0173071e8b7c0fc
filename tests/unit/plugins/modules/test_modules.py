"""The modules' own layer: argument handling and clean failures, before any server is reached."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import ClearRequest
from ansible_collections.pgops.dbrestore.plugins.modules import pg_restore_db, pg_terminate_connections

# a port nothing listens on: any attempt to connect fails at once
NOWHERE = {"login_host": "127.0.0.1", "login_port": 1, "login_password": "s3cret-value"}


def run(module, args: dict, capsys: pytest.CaptureFixture) -> dict:
    with patch_module_args(args), pytest.raises(SystemExit):
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
        (pg_restore_db, {"db": "x"}, "src (the dump to restore) is required"),
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


def test_terminate_request_mapping():
    params = {
        "db": "hoge_db", "state": "blocked", "block_new_connections": "revoke_connect", "block_roles": ["app"],
        "users": ["app"], "exclude_users": [], "application_names": ["unicorn*"], "exclude_application_names": [],
        "client_addrs": ["10.0.0.0/8"], "session_states": ["idle"], "cancel_first": True, "wait_timeout": 5.0,
        "fallback": "restart", "restart_service": "postgresql", "restart_pg_ctl": "pg_ctl", "restart_data_dir": None,
        "restart_command": [], "restart_become_user": None, "restart_sudo": True, "restart_timeout": 60,
    }  # fmt: skip
    req = ClearRequest.from_params(params)
    assert req.block == "revoke_connect" and req.block_roles == ("app",) and req.cancel_first
    assert req.session_filter.application_names == ("unicorn*",) and req.session_filter.states == ("idle",)
    assert req.restart is not None and req.restart.service == "postgresql" and req.restart.use_sudo
