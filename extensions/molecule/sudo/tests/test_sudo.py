"""What the sudo role promises, checked from inside the converged container.

Commands run through `setsid -w` under `podman exec` without -t, i.e. with no
controlling terminal, like a web server worker.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

INSTANCE = "pgops-sudo-bookworm"
SCENARIO_DIR = Path(__file__).resolve().parent.parent
RESTORE = "/usr/local/sbin/pgops-restore"
RESTORE_ARGS = ["--database", "app_prod", "--label=nightly,v2:a=b#c\\d"]
RESTART = ["/usr/bin/systemctl", "restart", "postgresql"]


def sudo(host, user, *argv, env=()):
    """Run `sudo -n argv` as `user` with no tty, `env` given as NAME=value strings."""
    words = ["runuser", "-u", user, "--", "env", *env, "setsid", "-w", "sudo", "-n", *argv]
    return host.run(" ".join(["%s"] * len(words)), *words)


def snapshot(host):
    return host.check_output("cd /etc && find sudoers sudoers.d -type f -exec sha256sum {} + | sort")


def run_playbook(playbook, *extra):
    """Run a playbook of this scenario against the instance; output is stdout and stderr."""
    cmd = [
        str(Path(sys.executable).with_name("ansible-playbook")),
        "-i", f"{INSTANCE},",
        "-c", "containers.podman.podman",
        *extra,
        str(SCENARIO_DIR / playbook),
    ]  # fmt: skip
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False)


def apply_role(rules, *extra):
    """Run the role against the instance with `rules` as sudo_rules."""
    return run_playbook("apply.yml", "-e", json.dumps({"sudo_rules": rules}), *extra)


def test_sudo_installed_and_configuration_valid(host):
    assert host.package("sudo").is_installed
    assert host.run("visudo -c").rc == 0
    assert host.file("/etc/sudoers").contains("^@includedir /etc/sudoers.d$")


@pytest.mark.parametrize("name", ["pgops-webapp", "pgops-restart", "tty-control"])
def test_dropin_root_owned_read_only(host, name):
    dropin = host.file(f"/etc/sudoers.d/{name}")
    assert dropin.is_file
    assert (dropin.user, dropin.group, dropin.mode) == ("root", "root", 0o440)
    assert dropin.contains("Ansible managed")


@pytest.mark.parametrize(
    ("user", "runas", "commands"),
    [
        (
            "webapp",
            "postgres",
            [RESTORE + r" --database app_prod --label\=nightly\,v2\:a\=b\#c\\d", RESTORE + " --status"],
        ),
        ("pgrestart", "root", [" ".join(RESTART)]),
    ],
)
def test_sudo_lists_only_configured_commands(host, user, runas, commands):
    # requiretty applies to root too: give the listing a (wide) pseudo-terminal.
    out = host.check_output("COLUMNS=500 script -qec %s /dev/null", f"sudo -ll -U {user}").replace("\r", "")
    assert out.count("Sudoers entry:") == 1, out
    assert f"RunAsUsers: {runas}\n" in out
    listed = out.split("Commands:\n", 1)[1].splitlines()
    assert [line.strip() for line in listed if line.strip()] == commands


def test_requiretty_stays_in_force_for_other_users(host):
    assert host.file("/etc/sudoers").contains("^Defaults requiretty$")
    result = sudo(host, "ttyuser", "/usr/bin/id")
    assert result.rc != 0
    assert "must have a tty" in result.stderr


def test_requiretty_after_the_include_is_refused(host):
    host.check_output("sed -i '$a Defaults requiretty' /etc/sudoers")
    try:
        result = apply_role([{"name": "pgops-late", "user": "webapp", "commands": [{"path": RESTORE, "args": []}]}])
    finally:
        host.check_output("sed -i '$d' /etc/sudoers")
    assert result.returncode != 0
    assert "sets requiretty after including /etc/sudoers.d" in result.stdout
    assert "pgops-late" in result.stdout
    assert not host.file("/etc/sudoers.d/pgops-late").exists


def test_webapp_runs_exact_command_without_tty(host):
    result = sudo(host, "webapp", "-u", "postgres", RESTORE, *RESTORE_ARGS)
    assert result.rc == 0, result.stderr
    assert result.stdout.startswith("pgops-restore as postgres: [--database] [app_prod] [--label=nightly,v2:a=b#c\\d]")
    assert sudo(host, "webapp", "-u", "postgres", RESTORE, "--status").rc == 0


def test_only_listed_environment_is_kept(host):
    env = ["APP_REQUEST_ID=r-42", "APP_OTHER=leak"]
    result = sudo(host, "webapp", "-u", "postgres", RESTORE, "--status", env=env)
    assert result.rc == 0, result.stderr
    assert "request=r-42 other=\n" in result.stdout


def test_pgrestart_restarts_postgresql(host):
    def main_pid():
        return host.check_output("systemctl show -P MainPID postgresql")

    before = main_pid()
    result = sudo(host, "pgrestart", *RESTART)
    assert result.rc == 0, result.stderr
    assert host.service("postgresql").is_running
    assert main_pid() not in (before, "0")


@pytest.mark.parametrize(
    ("user", "argv"),
    [
        ("webapp", ["-u", "postgres", "/usr/bin/id"]),
        ("webapp", ["-u", "postgres", RESTORE, "--database", "other"]),
        ("webapp", ["-u", "postgres", RESTORE, *RESTORE_ARGS, "--drop-everything"]),
        ("webapp", ["-u", "postgres", RESTORE]),
        ("webapp", [RESTORE, *RESTORE_ARGS]),  # right command, wrong run-as user
        ("webapp", ["-u", "root", "/bin/sh", "-c", "id -u"]),
        ("webapp", ["-e", "/etc/shadow"]),
        ("webapp", ["-s"]),
        ("pgrestart", ["/bin/sh", "-c", "id -u"]),
        ("pgrestart", ["-e", "/etc/shadow"]),
        ("pgrestart", ["/usr/bin/systemctl", "stop", "postgresql"]),
        ("pgrestart", ["/usr/bin/systemctl", "restart", "postgresql", "ssh"]),
        ("pgrestart", ["/usr/bin/systemctl", "restart"]),
        ("pgrestart", ["-u", "postgres", *RESTART]),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_escalation_refused(host, user, argv):
    result = sudo(host, user, *argv)
    assert result.rc == 1
    assert "a password is required" in result.stderr
    assert result.stdout == ""


def test_path_hijack_runs_the_real_binary(host):
    host.check_output(
        "runuser -u pgrestart -- sh -c %s",
        "mkdir -p ~/bin && printf '#!/bin/sh\\ntouch /tmp/hijacked\\n' > ~/bin/systemctl && chmod 755 ~/bin/systemctl",
    )
    home = host.user("pgrestart").home
    result = sudo(host, "pgrestart", "systemctl", "restart", "postgresql", env=[f"PATH={home}/bin:/usr/bin:/bin"])
    assert not host.file("/tmp/hijacked").exists
    assert result.rc == 0, result.stderr  # secure_path resolved the real systemctl


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ({"path": "ALL"}, "ALL allows every command"),
        ({"path": "/usr/bin/systemctl", "args": ["restart", "postgresql*"]}, "wildcards"),
        ({"path": "usr/bin/systemctl", "args": ["restart", "postgresql"]}, "path must be absolute"),
        ({"path": "/bin/bash", "args": []}, "shell, interpreter"),
        ({"path": "/usr/bin/python3", "args": ["-c", "print(1)"]}, "shell, interpreter"),
        ({"path": "/usr/bin/vim.tiny", "args": ["/etc/hosts"]}, "shell, interpreter"),
        ({"path": "/usr/bin/env", "args": ["id"]}, "shell, interpreter"),
        ({"path": RESTORE}, "sudo would accept any arguments"),
        ({"path": RESTORE, "args": ["--database app_prod"]}, "whitespace"),
    ],
    ids=lambda v: v.get("path") if isinstance(v, dict) else v,
)
def test_refused_rule_changes_nothing(host, command, reason):
    before = snapshot(host)
    rules = [
        {"name": "pgops-harmless", "user": "webapp", "commands": [{"path": "/usr/bin/id", "args": []}]},
        {"name": "pgops-webapp", "user": "webapp", "commands": [command]},
    ]
    result = apply_role(rules)
    assert result.returncode != 0
    assert f"sudo_rules entry 'pgops-webapp' refused, command {command['path']}: " in result.stdout
    assert reason in result.stdout
    assert snapshot(host) == before
    assert not host.file("/etc/sudoers.d/pgops-harmless").exists


@pytest.mark.parametrize(
    "name",
    [
        "PYTHONPATH", "PYTHONSTARTUP", "LD_PRELOAD", "GLIBC_TUNABLES", "PERL5LIB", "NODE_OPTIONS",
        "PGOPTIONS", "PGSERVICEFILE", "PGPASSFILE", "PATH", "IFS", "BASH_ENV", "SHELLOPTS", "HOME",
        "GCONV_PATH", "http_proxy", "Pythonpath",
    ],
)  # fmt: skip
def test_unsafe_env_keep_refused_changes_nothing(host, name):
    before = snapshot(host)
    rules = [
        {"name": "pgops-harmless", "user": "webapp", "commands": [{"path": "/usr/bin/id", "args": []}]},
        {
            "name": "pgops-webapp",
            "user": "webapp",
            "runas": "postgres",
            "env_keep": ["APP_REQUEST_ID", name],
            "commands": [{"path": RESTORE, "args": ["--status"]}],
        },
    ]
    result = apply_role(rules)
    assert result.returncode != 0
    assert f"sudo_rules entry 'pgops-webapp' refused: env_keep {name}: " in result.stdout, result.stdout
    assert "run as postgres" in result.stdout
    assert "set allow_unsafe_env: true in this rule set" in result.stdout
    assert snapshot(host) == before
    assert not host.file("/etc/sudoers.d/pgops-harmless").exists


def test_allow_unsafe_env_opts_in(host):
    """allow_unsafe_env waives the refusal for its own rule set only; allow_unsafe does not."""
    dropin = host.file("/etc/sudoers.d/pgops-unsafe-env")
    rule = {
        "name": "pgops-unsafe-env",
        "user": "webapp",
        "env_keep": ["PYTHONPATH"],
        "commands": [{"path": RESTORE, "args": []}],
    }

    refused = apply_role([{**rule, "allow_unsafe": True}])
    assert refused.returncode != 0
    assert "env_keep PYTHONPATH: " in refused.stdout
    assert not dropin.exists

    assert apply_role([{**rule, "allow_unsafe_env": True}]).returncode == 0
    assert 'Defaults:webapp env_keep += "PYTHONPATH"\n' in dropin.content_string
    assert apply_role([{"name": "pgops-unsafe-env", "state": "absent"}]).returncode == 0
    assert not dropin.exists


def test_rule_visudo_rejects_keeps_previous_dropin(host):
    before = snapshot(host)
    # Passes the role's checks, but "Defaults" is a sudoers keyword.
    rules = [{"name": "pgops-webapp", "user": "Defaults", "commands": [{"path": RESTORE, "args": ["--status"]}]}]
    result = apply_role(rules)
    assert result.returncode != 0
    assert "failed to validate" in result.stdout
    assert "syntax error" in result.stdout  # visudo's own message
    assert snapshot(host) == before


def test_allow_unsafe_and_state_absent(host):
    dropin = host.file("/etc/sudoers.d/pgops-unsafe")
    rules = [{"name": "pgops-unsafe", "user": "webapp", "allow_unsafe": True, "commands": [{"path": "/bin/bash"}]}]
    assert apply_role(rules).returncode == 0
    assert dropin.exists
    assert sudo(host, "webapp", "/bin/bash", "-c", "id -un").stdout == "root\n"

    absent = [{"name": "pgops-unsafe", "state": "absent"}]
    check = apply_role(absent, "--check")
    assert check.returncode == 0
    assert "changed=1" in check.stdout
    assert dropin.exists

    assert apply_role(absent).returncode == 0
    assert not dropin.exists
    assert sudo(host, "webapp", "/bin/bash", "-c", "id -un").rc == 1


def test_converge_in_check_and_diff_mode_changes_nothing(host):
    result = run_playbook("converge.yml", "--check", "--diff")
    assert result.returncode == 0, result.stdout
    assert "changed=0" in result.stdout
