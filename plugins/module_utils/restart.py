# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The restart fallback: when sessions cannot be terminated (old server, no privilege)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import ConnParams, PgOpsError, connect

FALLBACKS = ("none", "restart")


@dataclass(frozen=True)
class RestartSpec:
    """How to restart the server when sessions cannot be terminated (old server, no privilege)."""

    service: str | None = None  # systemd unit or init script name
    pg_ctl: str | None = None  # path of pg_ctl, used with data_dir
    data_dir: str | None = None
    command: tuple[str, ...] = ()  # explicit argv, used as is
    become_user: str | None = None  # run as this user (sudo -n -u, or runuser when we are root)
    use_sudo: bool = False  # prefix "sudo -n" (root) when no become_user is set
    timeout: int = 120

    def __post_init__(self) -> None:
        if not (self.command or self.service or self.data_dir):
            raise PgOpsError(
                "fallback=restart needs restart_service, restart_data_dir (with pg_ctl) or restart_command"
            )

    def argv(self) -> list[str]:
        if self.command:
            base = list(self.command)
        elif self.service:
            if os.path.isdir("/run/systemd/system"):
                base = ["systemctl", "restart", self.service]
            else:
                base = ["service", self.service, "restart"]
        else:  # data_dir, checked in __post_init__
            base = [self.pg_ctl or "pg_ctl", "restart", "-D", str(self.data_dir), "-m", "fast", "-w"]
            base += ["-t", str(self.timeout)]
        if self.become_user:
            if os.geteuid() == 0:
                return ["runuser", "-u", self.become_user, "--", *base]
            return ["sudo", "-n", "-u", self.become_user, "--", *base]
        if self.use_sudo:
            return ["sudo", "-n", "--", *base]
        return base


def restart_argument_spec() -> dict[str, dict[str, Any]]:
    """The restart fallback options (documented in doc_fragments/restart.py)."""
    return dict(
        fallback=dict(type="str", default="none", choices=list(FALLBACKS)),
        restart_service=dict(type="str"),
        restart_data_dir=dict(type="path"),
        restart_pg_ctl=dict(type="path", default="pg_ctl"),
        restart_command=dict(type="list", elements="str", default=[]),
        restart_become_user=dict(type="str"),
        restart_sudo=dict(type="bool", default=False),
        restart_timeout=dict(type="int", default=120),
    )


def restart_spec_from_params(p: dict[str, Any]) -> RestartSpec | None:
    if p.get("fallback") != "restart":
        return None
    return RestartSpec(
        service=p["restart_service"],
        pg_ctl=p["restart_pg_ctl"],
        data_dir=p["restart_data_dir"],
        command=tuple(p["restart_command"]),
        become_user=p["restart_become_user"],
        use_sudo=p["restart_sudo"],
        timeout=p["restart_timeout"],
    )


def restart_server(spec: RestartSpec) -> list[str]:
    """Run the restart command; its output goes to files, as the new postmaster inherits them."""
    argv = spec.argv()
    with tempfile.TemporaryFile("w+") as out:
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                timeout=spec.timeout + 30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PgOpsError(f"restart command {argv} failed: {exc}") from exc
        out.seek(0)
        text = out.read().strip()
    if proc.returncode != 0:
        raise PgOpsError(f"restart command {argv} exited with {proc.returncode}: {text.splitlines()[-1:] or ''}")
    return argv


def wait_for_server(params: ConnParams, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(params)
        except PgOpsError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
