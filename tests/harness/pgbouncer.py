"""Real PgBouncer processes (Debian's pgbouncer package) in front of a test server, and a probe of clients.

Each PgBouncer runs in the foreground on a free loopback port with a generated pgbouncer.ini (its own
directory, no unix socket), authenticates its clients with the test server's superuser password and
logs in to the server with it; the superuser is its admin user. stop() ends only the process it started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.harness.pg import OS_USER, SUPERUSER, SUPERUSER_PASSWORD, PgServer, _server_tmp, free_port

BINARY = "/usr/sbin/pgbouncer"
SLOW_MS = 20  # queries slower than this are kept with their start, to tell where in a run they waited


@dataclass
class PgBouncer:
    pg: PgServer
    pool_mode: str = "transaction"
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> database on the server; "*" always routes
    port: int = field(default_factory=free_port)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pgops-pgbouncer-", dir=_server_tmp())))
    proc: subprocess.Popen | None = None

    def start(self) -> PgBouncer:
        if not os.access(BINARY, os.X_OK):
            raise RuntimeError(f"{BINARY} is missing: apt-get install pgbouncer (.ci/run installs it)")
        os.chmod(self.dir, 0o755)
        users = self.dir / "userlist.txt"
        users.write_text(f'"{SUPERUSER}" "{SUPERUSER_PASSWORD}"\n')
        server = f"host=127.0.0.1 port={self.pg.port}"
        quoted = {alias: "'" + db.replace("\\", "\\\\").replace("'", "\\'") + "'" for alias, db in self.aliases.items()}
        routes = [f"{alias} = {server} dbname={db}" for alias, db in quoted.items()] + [f"* = {server}"]
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n" + "\n".join(routes) + "\n[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {users}\nadmin_users = {SUPERUSER}\n"
            f"pool_mode = {self.pool_mode}\ndefault_pool_size = 20\nmax_client_conn = 200\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\nserver_login_retry = 1\n"
        )
        for f in (users, ini):
            os.chmod(f, 0o644)
        log = self.dir / "pgbouncer.log"
        log.touch()
        argv = [BINARY, str(ini)]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            shutil.chown(self.dir, OS_USER)
            shutil.chown(log, OS_USER)
            argv[1:1] = ["-u", OS_USER]
        with open(self.dir / "stderr.log", "wb") as err:  # what it says before it opens its logfile
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         cwd="/")  # fmt: skip
        deadline = time.monotonic() + 15
        while True:
            try:
                self.admin().close()
                return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    why = (self.dir / "stderr.log").read_text()[-1000:] + log.read_text()[-1000:]
                    self.stop()
                    raise RuntimeError(f"pgbouncer did not start: {why}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def conninfo(self, dbname: str) -> dict:
        return dict(host="127.0.0.1", port=self.port, user=SUPERUSER, password=SUPERUSER_PASSWORD, dbname=dbname)

    def admin(self):
        return psycopg.connect(autocommit=True, connect_timeout=5, **self.conninfo("pgbouncer"))

    def target(self, database: str | None = None) -> dict:
        """The entry of pg_restore_db's pgbouncers option for this PgBouncer."""
        entry = {"host": "127.0.0.1", "port": self.port, "user": SUPERUSER, "password": SUPERUSER_PASSWORD}
        return {**entry, "database": database} if database else entry

    def paused(self, alias: str) -> bool:
        with self.admin() as conn:
            cur = conn.execute("SHOW DATABASES")
            names = [d.name for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        return any(r["name"] == alias and int(r["paused"]) for r in rows)


@dataclass
class ProbeClient:
    queries: int = 0
    failed: int = 0  # queries that raised (the app would have seen an error)
    errors: list[str] = field(default_factory=list)
    longest_ms: float = 0.0  # the slowest successful query, the wait the app saw
    longest_at: float = 0.0  # when it started (time.monotonic())
    slow: list[tuple[float, float]] = field(default_factory=list)  # (UNIX start, ms) of queries over SLOW_MS
    last_value: object = None
    connected: bool = False


@dataclass
class Probe:
    """Clients that keep one pooled connection each and run `query` every `interval` s, timing each query;
    a failed query is counted and the client reconnects."""

    conninfo: dict
    query: str
    clients: int = 20
    interval: float = 0.01
    stats: list[ProbeClient] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Probe:
        for i in range(self.clients):
            st = ProbeClient()
            self.stats.append(st)
            t = threading.Thread(target=self._run, args=(st, f"probe-{i}"), daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def _run(self, st: ProbeClient, name: str) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    # no server-side prepared statements behind PgBouncer 1.18 in transaction pooling
                    conn = psycopg.connect(autocommit=True, application_name=name, connect_timeout=5,
                                           prepare_threshold=None, **self.conninfo)  # fmt: skip
                    st.connected = True
                t, wall = time.monotonic(), time.time()
                row = conn.execute(self.query).fetchone()
                took = (time.monotonic() - t) * 1000
                if took > SLOW_MS:
                    st.slow.append((wall, took))
                if took > st.longest_ms:
                    st.longest_ms, st.longest_at = took, t
                st.last_value = row[0] if row else None
                st.queries += 1
            except psycopg.Error as exc:
                st.failed += 1
                st.errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                st.connected = False
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(self.interval)
        if conn is not None:
            conn.close()

    def wait(self, pred, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(f"probe: {what} not reached in {timeout}s")
            time.sleep(0.02)

    def wait_all_read(self, value: object, timeout: float = 30) -> None:
        """Every client has run a query since now and read `value`."""
        since = [s.queries for s in self.stats]
        self.wait(lambda: all(s.queries > n and s.last_value == value for s, n in zip(self.stats, since, strict=True)),
                  f"every client reading {value!r}", timeout)  # fmt: skip

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.stats)

    @property
    def queries(self) -> int:
        return sum(s.queries for s in self.stats)

    @property
    def longest_ms(self) -> float:
        return max((s.longest_ms for s in self.stats), default=0.0)

    def longest_between(self, start: float, end: float) -> float:
        """The longest query (ms) that was running at some moment between the UNIX times start and end."""
        return max((ms for s in self.stats for at, ms in s.slow if at <= end and at + ms / 1000 >= start), default=0.0)

    @property
    def errors(self) -> list[str]:
        return [e for s in self.stats for e in s.errors]
