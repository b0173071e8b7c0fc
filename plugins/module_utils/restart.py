# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The restart fallback: when sessions cannot be terminated (old server, no privilege).

A server managed by Patroni is restarted through Patroni's REST API (POST /restart of that member),
never with systemctl or pg_ctl behind its back, which Patroni may answer with a failover; a restart
command on a node that looks managed (Patroni's REST API answers on this host, or the data directory
holds patroni.dynamic.json) is refused.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import ConnParams, PgOpsError, connect

FALLBACKS = ("none", "restart")
# where a Patroni on this host answers unless configured otherwise (restapi.listen's default port)
PATRONI_LOCAL_URL = "http://127.0.0.1:8008"
LEADER_ROLES = ("master", "primary", "standby_leader")


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
    patroni_url: str | None = None  # Patroni REST API of this member: restart through it, nothing else
    patroni_user: str | None = None  # REST API basic auth (restapi.authentication)
    patroni_password: str | None = None

    def __post_init__(self) -> None:
        if not (self.command or self.service or self.data_dir or self.patroni_url):
            raise PgOpsError(
                "fallback=restart needs restart_patroni_url, restart_service, restart_data_dir (with pg_ctl) or "
                "restart_command"
            )

    def argv(self) -> list[str]:
        """The command run (for a Patroni member: the REST call, as it is reported)."""
        if self.patroni_url:
            return ["POST", self.patroni_url.rstrip("/") + "/restart"]
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
        restart_patroni_url=dict(type="str"),
        restart_patroni_user=dict(type="str"),
        restart_patroni_password=dict(type="str", no_log=True),
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
        patroni_url=p.get("restart_patroni_url"),
        patroni_user=p.get("restart_patroni_user"),
        patroni_password=p.get("restart_patroni_password"),
    )


def patroni_call(url: str, spec: RestartSpec, method: str = "GET", body: dict | None = None,
                 timeout: float = 5) -> tuple[int, Any]:  # fmt: skip
    """One Patroni REST API request: (HTTP status, parsed JSON or text); PgOpsError when it does not answer.

    Plain http.client (module_utils also run without Ansible, so not ansible.module_utils.urls).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PgOpsError(f"{url!r} is not an http(s) URL of Patroni's REST API: check restart_patroni_url")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if spec.patroni_user:
        token = base64.b64encode(f"{spec.patroni_user}:{spec.patroni_password or ''}".encode()).decode()
        headers["Authorization"] = "Basic " + token
    try:
        conn.request(method, parts.path or "/", body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        status, raw = resp.status, resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise PgOpsError(f"Patroni's REST API at {url} does not answer: {exc}") from exc
    finally:
        conn.close()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.strip()


def patroni_member(spec: RestartSpec) -> dict:
    """GET /patroni of the configured member (state, role, postmaster_start_time)."""
    url = spec.patroni_url.rstrip("/") + "/patroni"  # type: ignore[union-attr]
    status, member = patroni_call(url, spec)
    if status != 200 or not isinstance(member, dict) or "patroni" not in member:
        raise PgOpsError(f"{url} is not Patroni's REST API (HTTP {status}): check restart_patroni_url")
    return member


def managed_by_patroni(spec: RestartSpec) -> str:
    """Why a restart command would go behind Patroni's back ("" when nothing says the server is managed)."""
    if spec.data_dir and os.path.exists(os.path.join(spec.data_dir, "patroni.dynamic.json")):
        return f"{spec.data_dir} holds patroni.dynamic.json"
    try:
        status, member = patroni_call(PATRONI_LOCAL_URL + "/patroni", spec, timeout=2)
    except PgOpsError:
        return ""
    if status == 200 and isinstance(member, dict) and "patroni" in member:
        return f"Patroni's REST API answers at {PATRONI_LOCAL_URL}"
    return ""


def refuse_if_managed(spec: RestartSpec) -> None:
    if spec.patroni_url:
        return
    why = managed_by_patroni(spec)
    if why:
        raise PgOpsError(
            f"this PostgreSQL is managed by Patroni ({why}): restarting it with {' '.join(spec.argv())} behind "
            "Patroni's back can trigger a failover; set restart_patroni_url to the member's REST API (for example "
            f"{PATRONI_LOCAL_URL}) to restart it through Patroni"
        )


def check_restart(spec: RestartSpec) -> None:
    """What restart_server would refuse, found without restarting (preflight, check mode)."""
    if spec.patroni_url:
        patroni_member(spec)
    else:
        refuse_if_managed(spec)


def restart_through_patroni(spec: RestartSpec) -> list[str]:
    """POST /restart of the member (Patroni restarts it and waits up to the timeout); it must come back running."""
    argv = spec.argv()
    before = patroni_member(spec)
    status, answer = patroni_call(argv[1], spec, "POST", {"timeout": spec.timeout}, timeout=spec.timeout + 30)
    if status != 200:
        raise PgOpsError(f"Patroni refused or failed the restart ({argv[1]}, HTTP {status}): {answer}")
    after = patroni_member(spec)
    if after.get("state") != "running":
        raise PgOpsError(f"Patroni restarted the member, but it is {after.get('state')!r}, not running")
    if before.get("role") in LEADER_ROLES and after.get("role") not in LEADER_ROLES:
        raise PgOpsError(f"the member was the leader before the restart and is {after.get('role')!r} now")
    return argv


def restart_server(spec: RestartSpec) -> list[str]:
    """Run the restart command (or the Patroni REST call); a command's output goes to files, as the new postmaster
    inherits them."""
    if spec.patroni_url:
        return restart_through_patroni(spec)
    refuse_if_managed(spec)
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
