"""Pure logic of the session layer: filters, restart commands, request validation, error lines."""

from __future__ import annotations

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    ConnParams,
    PgOpsError,
    ServerInfo,
    one_line,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import (
    ClearRequest,
    RestartSpec,
    Session,
    SessionFilter,
    privilege_problem,
)


def session(**kw) -> Session:
    base = dict(pid=1, user="app", application="unicorn worker[1]", client="10.1.2.3", state="idle",
                backend_start=None, can_signal=True)  # fmt: skip
    return Session(**{**base, **kw})


@pytest.mark.parametrize(
    ("flt", "sess", "expected"),
    [
        (SessionFilter(), session(), True),
        (SessionFilter(users=("app",)), session(user="admin"), False),
        (SessionFilter(exclude_users=("app",)), session(), False),
        (SessionFilter(application_names=("unicorn*",)), session(), True),
        (SessionFilter(application_names=("puma*",)), session(), False),
        (SessionFilter(exclude_application_names=("unicorn*",)), session(), False),
        (SessionFilter(client_addrs=("10.1.0.0/16",)), session(), True),
        (SessionFilter(client_addrs=("10.2.0.0/16",)), session(), False),
        (SessionFilter(client_addrs=("local",)), session(client=None), True),
        (SessionFilter(client_addrs=("10.0.0.0/8",)), session(client=None), False),
        (SessionFilter(client_addrs=("::1",)), session(client="::1"), True),
        (SessionFilter(states=("active",)), session(), False),
        (SessionFilter(states=("idle", "active")), session(), True),
    ],
)
def test_filter(flt: SessionFilter, sess: Session, expected: bool):
    assert flt.matches(sess) is expected


def test_filter_rejects_bad_values():
    with pytest.raises(PgOpsError, match="unknown session state"):
        SessionFilter(states=("sleeping",))
    with pytest.raises(PgOpsError, match=r"10\.0\.0\.300"):
        SessionFilter(client_addrs=("10.0.0.300",))


def test_restart_argv(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert RestartSpec(command=("/etc/init.d/postgresql", "restart"), use_sudo=True).argv() == [
        "sudo", "-n", "--", "/etc/init.d/postgresql", "restart"]  # fmt: skip
    argv = RestartSpec(pg_ctl="/usr/lib/postgresql/15/bin/pg_ctl", data_dir="/srv/pg", become_user="postgres").argv()
    assert argv[:6] == ["sudo", "-n", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl"]
    assert argv[6:] == ["restart", "-D", "/srv/pg", "-m", "fast", "-w", "-t", "120"]
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert RestartSpec(data_dir="/srv/pg", become_user="postgres").argv()[:4] == ["runuser", "-u", "postgres", "--"]
    with pytest.raises(PgOpsError, match="needs restart_service"):
        RestartSpec().argv()


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(state="blocked"), "state=blocked needs block_new_connections"),
        (dict(state="gone"), "state must be one of"),
        (dict(block="kill"), "block_new_connections must be one of"),
        (dict(fallback="restart"), "fallback=restart needs"),
    ],
)
def test_request_validation(kw: dict, msg: str):
    with pytest.raises(PgOpsError, match=msg):
        ClearRequest(db="x", **kw)


def test_server_info_version_rules():
    old = ServerInfo(version_num=80300, version="8.3.23", is_superuser=True, current_user="postgres")
    assert old.pid_column == "procpid" and not old.can_terminate_backends
    v91 = ServerInfo(version_num=90124, version="9.1.24", is_superuser=True, current_user="postgres")
    assert v91.pid_column == "procpid" and v91.can_terminate_backends and not v91.has_allow_connections
    v10 = ServerInfo(version_num=100023, version="10.23", is_superuser=False, current_user="app")
    assert v10.pid_column == "pid" and v10.has_signal_backend_role
    assert "added in 8.4" in privilege_problem(old, "d", [])
    assert 'GRANT pg_signal_backend TO "app"' in privilege_problem(v10, "d", [])


def test_one_line_takes_the_cause():
    err = Exception('connection to server at "127.0.0.1", port 1 failed: Connection refused\n\tIs the server running?')
    assert one_line(err).startswith('connection to server at "127.0.0.1"')
    cause = 'connection to server at "h" failed: FATAL:  password authentication failed'
    err2 = Exception(f'connection to server at "h" failed: x\n{cause}')
    assert one_line(err2) == cause


def test_conn_params_env_never_needs_a_shell():
    params = ConnParams.from_params({"login_user": "u", "login_password": "p w'\"", "login_unix_socket": "/run/pg",
                                     "login_host": "ignored", "connect_params": {"options": "-c x=1"}})  # fmt: skip
    env = params.libpq_env()
    assert env["PGHOST"] == "/run/pg" and env["PGPASSWORD"] == "p w'\"" and env["PGUSER"] == "u"
    assert params.libpq_kwargs()["options"] == "-c x=1"
    assert "p w" not in params.describe()
