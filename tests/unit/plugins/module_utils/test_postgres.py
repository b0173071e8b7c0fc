"""postgres.py without a server: errors, connection settings, version rules."""

from __future__ import annotations

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    INSUFFICIENT_PRIVILEGE,
    LOCK_NOT_AVAILABLE,
    OBJECT_IN_USE,
    SAFE_SEARCH_PATH,
    ConnParams,
    PgOpsError,
    ServerInfo,
    one_line,
    sql_error,
)


def test_error_keeps_sqlstate_and_details():
    err = PgOpsError("boom", sqlstate=OBJECT_IN_USE, log=["a"], changed=True)
    assert str(err) == "boom" and err.sqlstate == "55006" and err.details == {"log": ["a"], "changed": True}
    assert PgOpsError("plain").sqlstate is None and PgOpsError("plain").details == {}
    assert (OBJECT_IN_USE, LOCK_NOT_AVAILABLE, INSUFFICIENT_PRIVILEGE) == ("55006", "55P03", "42501")


def test_sql_error_is_one_line_with_the_sqlstate():
    class Fake(Exception):
        sqlstate = "42501"

    err = sql_error(Fake('permission denied for database "x"\nDETAIL: more'), "cannot close")
    assert str(err) == 'cannot close: permission denied for database "x"' and err.sqlstate == "42501"
    assert sql_error(ValueError(""), "what").sqlstate is None


def test_server_info_version_rules():
    old = ServerInfo(version_num=80300, version="8.3.23", is_superuser=True, current_user="postgres")
    assert old.pid_column == "procpid" and not old.can_terminate_backends
    v91 = ServerInfo(version_num=90124, version="9.1.24", is_superuser=True, current_user="postgres")
    assert v91.pid_column == "procpid" and v91.can_terminate_backends
    v95 = ServerInfo(version_num=90500, version="9.5.0", is_superuser=True, current_user="postgres")
    assert v95.pid_column == "pid" and not v95.has_signal_backend_role
    v10 = ServerInfo(version_num=100023, version="10.23", is_superuser=False, current_user="app")
    assert v10.has_signal_backend_role


def test_one_line_takes_the_cause():
    err = Exception('connection to server at "127.0.0.1", port 1 failed: Connection refused\n\tIs the server running?')
    assert one_line(err).startswith('connection to server at "127.0.0.1"')
    cause = 'connection to server at "h" failed: FATAL:  password authentication failed'
    err2 = Exception(f'connection to server at "h" failed: x\n{cause}')
    assert one_line(err2) == cause
    assert one_line(KeyError()) == "KeyError"


def test_every_connection_pins_the_search_path():
    assert SAFE_SEARCH_PATH == "pg_catalog, pg_temp"
    assert ConnParams().libpq_kwargs()["options"] == "-c search_path=pg_catalog,pg_temp"
    # the caller's options are kept, and the pin comes last so that it wins over theirs
    mixed = ConnParams(connect_params=(("options", "-c search_path=evil -c work_mem=8MB"),)).libpq_kwargs()
    assert mixed["options"] == "-c search_path=evil -c work_mem=8MB -c search_path=pg_catalog,pg_temp"


def test_conn_params_env_never_needs_a_shell(monkeypatch: pytest.MonkeyPatch):
    params = ConnParams.from_params({"login_user": "u", "login_password": "p w'\"", "login_unix_socket": "/run/pg",
                                     "login_host": "ignored", "connect_params": {"options": "-c x=1"}})  # fmt: skip
    env = params.libpq_env()
    assert env["PGHOST"] == "/run/pg" and env["PGPASSWORD"] == "p w'\"" and env["PGUSER"] == "u"
    assert params.libpq_kwargs()["options"].startswith("-c x=1 ")
    assert "p w" not in params.describe() and params.describe() == "u@/run/pg:5432/postgres"
    monkeypatch.setenv("PGSERVICE", "elsewhere")
    monkeypatch.setenv("PGPASSFILE", "/tmp/x")
    monkeypatch.setenv("LANG", "C.UTF-8")
    tool = params.tool_env()
    assert "PGSERVICE" not in tool and "PGPASSFILE" not in tool and tool["LANG"] == "C.UTF-8"
    assert tool["PGPASSWORD"] == "p w'\"" and tool["PGDATABASE"] == "postgres"


def test_with_db_changes_only_the_database():
    p = ConnParams(login_user="u", login_port=6543, connect_params=(("a", "b"),))
    q = p.with_db("other")
    assert q.login_db == "other" and q.login_user == "u" and q.login_port == 6543 and q.connect_params == (("a", "b"),)
    assert p.login_db == "postgres"
