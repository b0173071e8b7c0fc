"""restart.py without a server: the restart command line for each way of configuring it."""

from __future__ import annotations

import pytest

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.restart import (
    FALLBACKS,
    RestartSpec,
    restart_argument_spec,
    restart_server,
    restart_spec_from_params,
)


@pytest.fixture
def not_root(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)


def test_explicit_command_with_sudo(not_root):
    spec = RestartSpec(command=("/etc/init.d/postgresql", "restart"), use_sudo=True)
    assert spec.argv() == ["sudo", "-n", "--", "/etc/init.d/postgresql", "restart"]
    assert RestartSpec(command=("/bin/true",)).argv() == ["/bin/true"]


def test_pg_ctl_as_another_user(not_root):
    argv = RestartSpec(pg_ctl="/usr/lib/postgresql/15/bin/pg_ctl", data_dir="/srv/pg", become_user="postgres").argv()
    assert argv[:6] == ["sudo", "-n", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl"]
    assert argv[6:] == ["restart", "-D", "/srv/pg", "-m", "fast", "-w", "-t", "120"]
    # become_user wins over use_sudo: never "sudo -n sudo -n -u"
    both = RestartSpec(data_dir="/srv/pg", become_user="postgres", use_sudo=True, timeout=7).argv()
    assert both[:5] == ["sudo", "-n", "-u", "postgres", "--"] and both.count("sudo") == 1
    assert both[5:] == ["pg_ctl", "restart", "-D", "/srv/pg", "-m", "fast", "-w", "-t", "7"]


def test_service_uses_systemctl_or_service(not_root, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("os.path.isdir", lambda p: p == "/run/systemd/system")
    assert RestartSpec(service="postgresql@15-main").argv() == ["systemctl", "restart", "postgresql@15-main"]
    monkeypatch.setattr("os.path.isdir", lambda p: False)
    argv = RestartSpec(service="postgresql", use_sudo=True).argv()
    assert argv == ["sudo", "-n", "--", "service", "postgresql", "restart"]


def test_root_uses_runuser(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert RestartSpec(data_dir="/srv/pg", become_user="postgres").argv()[:4] == ["runuser", "-u", "postgres", "--"]


def test_needs_something_to_run():
    with pytest.raises(
        PgOpsError,
        match=r"fallback=restart needs restart_patroni_url, restart_service, restart_data_dir \(with pg_ctl\)",
    ):
        RestartSpec()
    with pytest.raises(PgOpsError, match="needs restart_patroni_url, restart_service"):
        RestartSpec(pg_ctl="/usr/bin/pg_ctl")  # pg_ctl without a data directory restarts nothing


def test_from_module_params():
    spec = restart_argument_spec()
    params = {k: v.get("default") for k, v in spec.items()}
    assert FALLBACKS == ("none", "restart") and spec["fallback"]["choices"] == list(FALLBACKS)
    assert restart_spec_from_params(params) is None  # fallback=none: no restart, whatever else is set
    params.update(fallback="restart", restart_data_dir="/srv/pg", restart_become_user="postgres", restart_timeout=9)
    assert restart_spec_from_params(params) == RestartSpec(pg_ctl="pg_ctl", data_dir="/srv/pg",
                                                           become_user="postgres", timeout=9)  # fmt: skip


def test_a_failing_command_is_one_clear_error(tmp_path):
    script = tmp_path / "restart.sh"
    script.write_text("#!/bin/sh\necho starting\necho 'pg_ctl: could not start server' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(PgOpsError, match=r"exited with 3: \['pg_ctl: could not start server'\]"):
        restart_server(RestartSpec(command=(str(script),)))
    with pytest.raises(PgOpsError, match=r"restart command \['/nonexistent/restart'\] failed"):
        restart_server(RestartSpec(command=("/nonexistent/restart",)))
    assert restart_server(RestartSpec(command=("true",))) == ["true"]
