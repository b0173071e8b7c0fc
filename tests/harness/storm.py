"""Reconnecting clients, as a pooled web app's workers behave.

Each client holds a connection, runs a query every `interval` seconds and, whenever the
connection breaks or cannot be opened, reconnects at once. Used to prove that a database can
be cleared and dropped while an app keeps hammering it, and to measure outages.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psycopg


@dataclass
class ClientStats:
    connects: int = 0
    failed_connects: int = 0
    last_connect_error: str = ""  # why the latest failed connection attempt failed
    connect_errors: set[str] = field(default_factory=set)  # every distinct reason an attempt failed
    queries: int = 0
    broken: int = 0  # connections ended under the client (terminated, server gone)
    last_ok: float = 0.0
    longest_gap: float = 0.0  # seconds between two successful queries, the app-visible outage
    connected: bool = False  # holds an open connection right now


@dataclass
class Storm:
    conninfo: dict
    clients: int = 60
    interval: float = 0.01
    query: str = "SELECT 1"
    name: str = "storm"  # application_name prefix, e.g. "unicorn worker"
    stats: list[ClientStats] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _errors_lock: threading.Lock = field(default_factory=threading.Lock)  # connect_errors grow while read

    def __enter__(self) -> Storm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        for i in range(self.clients):
            st = ClientStats()
            self.stats.append(st)
            t = threading.Thread(target=self._run, args=(st, f"{self.name}-{i}"), daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def wait_connected(self, at_least: int | None = None, timeout: float = 30) -> None:
        """Wait until this many clients hold a connection at the same moment (default: all)."""
        need = self.clients if at_least is None else at_least
        self._wait(lambda: sum(1 for s in self.stats if s.connected), need, "connected", timeout)

    def connects_now(self) -> list[int]:
        """Each client's count of successful connections so far, for wait_reconnected."""
        return [s.connects for s in self.stats]

    def wait_reconnected(self, since: list[int], at_least: int | None = None, timeout: float = 30) -> None:
        """Wait until this many clients (default: all) connected again after the moment `since` was taken
        (connects_now()) and hold that connection: a connection from before does not count."""
        need = self.clients if at_least is None else at_least

        def count() -> int:
            return sum(1 for s, before in zip(self.stats, since, strict=True) if s.connects > before and s.connected)

        self._wait(count, need, "reconnected", timeout)

    def errors_seen(self) -> list[str]:
        """Every distinct reason a client's connection attempt failed so far."""
        with self._errors_lock:
            return sorted(set().union(*(s.connect_errors for s in self.stats)))

    def wait_refused(self, because: str, timeout: float = 30) -> list[str]:
        """Wait until a client's connection attempt was refused naming `because`; returns errors_seen()."""
        self._wait(lambda: sum(1 for e in self.errors_seen() if because in e), 1, "refused", timeout)
        return self.errors_seen()

    def _wait(self, count, need: int, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while count() < need:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {count()} of {need} clients {what}; connection errors seen: "
                                   f"{self.errors_seen() or 'none'}")  # fmt: skip
            time.sleep(0.02)

    def _run(self, st: ClientStats, name: str) -> None:
        while not self._stop.is_set():
            try:
                conn = psycopg.connect(autocommit=True, application_name=name, connect_timeout=5, **self.conninfo)
            except psycopg.Error as exc:
                st.failed_connects += 1
                st.last_connect_error = str(exc)
                with self._errors_lock:
                    st.connect_errors.add(st.last_connect_error)
                time.sleep(0.001)
                continue
            st.connects += 1
            st.connected = True
            try:
                with conn:
                    while not self._stop.is_set():
                        conn.execute(self.query)
                        now = time.monotonic()
                        if st.last_ok:
                            st.longest_gap = max(st.longest_gap, now - st.last_ok)
                        st.last_ok = now
                        st.queries += 1
                        time.sleep(self.interval)
            except psycopg.Error:
                st.broken += 1
            finally:
                st.connected = False

    @property
    def total_connects(self) -> int:
        return sum(s.connects for s in self.stats)

    @property
    def total_broken(self) -> int:
        return sum(s.broken for s in self.stats)
