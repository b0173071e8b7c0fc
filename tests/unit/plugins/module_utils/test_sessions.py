"""sessions.py without a server: filters, request validation, results, the privilege message."""

from __future__ import annotations

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError, ServerInfo
from ansible_collections.pgops.dbrestore.plugins.module_utils.restart import RestartSpec
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import (
    BLOCK_CHOICES,
    TARGET_STATES,
    ClearRequest,
    ClearResult,
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
        (SessionFilter(users=("app",)), session(), True),
        (SessionFilter(users=("app",)), session(user="admin"), False),
        (SessionFilter(users=("app",)), session(user=None), False),  # a role we may not see
        (SessionFilter(exclude_users=("app",)), session(), False),
        (SessionFilter(exclude_users=("admin",)), session(), True),
        (SessionFilter(users=("app", "admin"), exclude_users=("admin",)), session(user="admin"), False),
        (SessionFilter(application_names=("unicorn*",)), session(), True),
        (SessionFilter(application_names=("puma*",)), session(), False),
        (SessionFilter(application_names=("Unicorn*",)), session(), False),  # case matters
        (SessionFilter(application_names=("unicorn worker[[]1]",)), session(), True),  # fnmatch, not regex
        (SessionFilter(exclude_application_names=("unicorn*",)), session(), False),
        (SessionFilter(exclude_application_names=("psql",)), session(), True),
        (SessionFilter(application_names=("*",), exclude_application_names=("unicorn*",)), session(), False),
        (SessionFilter(client_addrs=("10.1.0.0/16",)), session(), True),
        (SessionFilter(client_addrs=("10.1.2.3",)), session(), True),
        (SessionFilter(client_addrs=("10.2.0.0/16",)), session(), False),
        (SessionFilter(client_addrs=("local",)), session(client=None), True),
        (SessionFilter(client_addrs=("local",)), session(), False),
        (SessionFilter(client_addrs=("10.0.0.0/8",)), session(client=None), False),
        (SessionFilter(client_addrs=("::1",)), session(client="::1"), True),
        (SessionFilter(client_addrs=("fd00::/8",)), session(client="fd00::5"), True),
        (SessionFilter(client_addrs=("10.0.0.0/8",)), session(client="fd00::5"), False),
        (SessionFilter(states=("active",)), session(), False),
        (SessionFilter(states=("idle", "active")), session(), True),
        (SessionFilter(states=("idle",)), session(state=None), False),
        (SessionFilter(users=("app",), states=("idle",), client_addrs=("10.0.0.0/8",)), session(), True),
        (SessionFilter(users=("app",), states=("idle",), client_addrs=("192.168.0.0/16",)), session(), False),
    ],
)
def test_filter(flt: SessionFilter, sess: Session, expected: bool):
    assert flt.matches(sess) is expected


def test_filter_rejects_bad_values():
    with pytest.raises(PgOpsError, match=r"unknown session state\(s\) \['sleeping'\]"):
        SessionFilter(states=("sleeping",))
    with pytest.raises(PgOpsError, match=r"client address '10\.0\.0\.300' is neither an address"):
        SessionFilter(client_addrs=("10.0.0.300",))
    with pytest.raises(PgOpsError, match=r"client address 'localhost' is neither"):
        SessionFilter(client_addrs=("localhost",))


def test_session_report_hides_the_signal_flag():
    assert session().report() == {"pid": 1, "user": "app", "application": "unicorn worker[1]",
                                  "client": "10.1.2.3", "state": "idle", "backend_start": None}  # fmt: skip


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(state="blocked"), "state=blocked needs block_new_connections=allow_connections or revoke_connect"),
        (dict(state="gone"), r"state must be one of \['terminated', 'blocked', 'allowed'\], not 'gone'"),
        (dict(block="kill"), r"block_new_connections must be one of \['none', 'allow_connections', 'revoke_connect'\]"),
        (dict(fallback="reboot"), r"fallback must be one of \['none', 'restart'\], not 'reboot'"),
        (
            dict(fallback="restart"),
            "fallback=restart needs restart_patroni_url, restart_service, restart_data_dir or restart_command",
        ),
    ],
)
def test_request_validation(kw: dict, msg: str):
    with pytest.raises(PgOpsError, match=msg):
        ClearRequest(db="x", **kw)


def test_request_defaults():
    req = ClearRequest(db="x")
    assert (req.state, req.block, req.fallback, req.record_block) == ("terminated", "none", "none", True)
    assert req.session_filter == SessionFilter()
    assert not hasattr(req, "block_roles")  # revoke_connect takes CONNECT from every grantee now
    assert BLOCK_CHOICES == ("none", "allow_connections", "revoke_connect")
    assert TARGET_STATES == ("terminated", "blocked", "allowed")
    ClearRequest(db="x", fallback="restart", restart=RestartSpec(service="postgresql"))


def test_result_counts_what_it_lists():
    res = ClearResult(terminated=[session(pid=1).report(), session(pid=2).report()])
    assert res.terminated_count == 2
    data = res.as_dict()
    assert data["terminated_count"] == 2 and "count" not in data
    assert ClearResult().as_dict()["terminated_count"] == 0


def test_privilege_problem_names_the_fix():
    old = ServerInfo(version_num=80300, version="8.3.23", is_superuser=True, current_user="postgres")
    assert privilege_problem(old, "d", []).startswith("PostgreSQL 8.3.23 has no pg_terminate_backend (added in 8.4)")
    v10 = ServerInfo(version_num=100023, version="10.23", is_superuser=False, current_user="app")
    msg = privilege_problem(v10, "hoge_db", [session(user="web"), session(user="admin"), session(user="web")])
    assert msg.startswith('role "app" may not terminate 3 session(s) of role(s) admin, web on database "hoge_db"')
    assert 'Fix: GRANT pg_signal_backend TO "app", or set fallback=restart' in msg and "\n" not in msg
    v95 = ServerInfo(version_num=90524, version="9.5.24", is_superuser=False, current_user="app")
    assert "connect as a superuser (pg_signal_backend exists from 9.6 on)" in privilege_problem(v95, "d", [session()])
