"""A one-node Patroni cluster on loopback ports: Debian's etcd-server and patroni, the test server binaries.

etcd and Patroni run as the test servers' OS user (PostgreSQL refuses root) in a directory of their
own; Patroni bootstraps the data directory with initdb and manages the server. stop() ends only the
processes started here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import ConnParams
from tests.harness.pg import (
    OS_USER,
    SUPERUSER,
    SUPERUSER_PASSWORD,
    _ensure_os_user,
    _server_tmp,
    free_port,
    server_bindir,
)

ETCD = "/usr/bin/etcd"
PATRONI = "/usr/bin/patroni"


@dataclass
class PatroniCluster:
    major: int
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pgops-patroni-", dir=_server_tmp())))
    port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def _spawn(self, argv: list[str], log: str) -> None:
        """As the OS user directly (not through runuser, which would SIGKILL it 2 s after our SIGTERM)."""
        user = _ensure_os_user()
        who = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        env = {**os.environ, "HOME": str(self.dir)} if user else None
        with open(self.dir / log, "wb") as out:
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                               cwd="/", env=env, **who))  # fmt: skip

    def start(self) -> PatroniCluster:
        for tool in (ETCD, PATRONI):
            if not os.access(tool, os.X_OK):
                raise RuntimeError(f"{tool} is missing: apt-get install patroni etcd-server (.ci/run installs them)")
        user = _ensure_os_user()
        os.chmod(self.dir, 0o755)
        if user:
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        client, peer = free_port(), free_port()
        self._spawn([ETCD, "--name", "n1", "--data-dir", str(self.dir / "etcd"),
                     "--listen-client-urls", f"http://127.0.0.1:{client}",
                     "--advertise-client-urls", f"http://127.0.0.1:{client}",
                     "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-cluster", f"n1=http://127.0.0.1:{peer}"], "etcd.log")  # fmt: skip
        conf = {
            "scope": "pgops-test",
            "name": "node1",
            "restapi": {"listen": f"127.0.0.1:{self.api_port}", "connect_address": f"127.0.0.1:{self.api_port}"},
            "etcd3": {"hosts": f"127.0.0.1:{client}"},
            "bootstrap": {
                "dcs": {"ttl": 30, "loop_wait": 1, "retry_timeout": 10},
                "initdb": [
                    {"encoding": "UTF8"},
                    {"locale": "C"},
                    {"auth-host": "scram-sha-256"},
                    {"auth-local": "trust"},
                ],
                "pg_hba": [
                    "host all all 127.0.0.1/32 scram-sha-256",
                    "host replication all 127.0.0.1/32 scram-sha-256",
                    "local all all trust",
                ],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.port}",
                "connect_address": f"127.0.0.1:{self.port}",
                "data_dir": str(self.data_dir),
                "pgpass": str(self.dir / "pgpass"),
                "bin_dir": str(server_bindir(self.major)),
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": SUPERUSER_PASSWORD},
                    "replication": {"username": "replicator", "password": "replicator-secret"},
                },
                "parameters": {"unix_socket_directories": str(self.dir), "fsync": "off"},
            },
        }
        config = self.dir / "patroni.yml"
        config.write_text(json.dumps(conf))  # JSON is YAML
        os.chmod(config, 0o644)
        self._spawn([PATRONI, str(config)], "patroni.log")
        try:
            self.wait(lambda m: m.get("state") == "running" and m.get("role") in ("master", "primary"), "a leader", 60)
        except BaseException:
            self.stop()
            raise
        return self

    def member(self) -> dict:
        with urllib.request.urlopen(self.api + "/patroni", timeout=2) as resp:
            return json.loads(resp.read())

    def wait(self, pred, what: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                m = self.member()
                if pred(m):
                    return m
            except OSError:
                pass
            if time.monotonic() > deadline:
                log = (self.dir / "patroni.log").read_text()[-1500:] if (self.dir / "patroni.log").exists() else ""
                raise TimeoutError(f"Patroni: no {what} within {timeout}s: {log}")
            time.sleep(0.1)

    def params(self, **overrides) -> ConnParams:
        base = dict(login_user=SUPERUSER, login_password=SUPERUSER_PASSWORD, login_host="127.0.0.1",
                    login_port=self.port, login_db="postgres", ssl_mode="disable")  # fmt: skip
        return ConnParams(**{**base, **overrides})

    def stop(self) -> None:
        for proc in reversed(self.procs):  # Patroni first: it stops PostgreSQL; then etcd
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []
        if (self.data_dir / "postmaster.pid").exists():  # Patroni did not stop it: stop this cluster only
            argv = [str(server_bindir(self.major) / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "stop"]
            if os.geteuid() == 0:
                argv = ["runuser", "-u", OS_USER, "--", *argv]
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, cwd="/")
        shutil.rmtree(self.dir, ignore_errors=True)
