# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Progress of a running restore, in a small JSON file that another process can read while it runs.

The file <progress_dir>/<db, %-quoted>.json is replaced atomically (written beside it, then
renamed) every second and at every phase change. It holds the phase, tables, dump bytes and
indexes done of their totals (from the dump's table of contents and what pg_restore reports it
finished), what pg_stat_progress_copy (14+) and pg_stat_progress_create_index (12+) show for the
staging database, and the elapsed time; nothing secret. progress_line() turns it into the line
the role prints ("hoge_db: staging 43 % — 12/40 tables, 1.2 of 2.8 GB, 4/16 indexes, 00:01:52");
the role's waiting task and a status command share it.

Recording progress never fails a restore: a file that cannot be written is reported once as a warning.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
import time
from typing import Any
from urllib.parse import quote

# phase (a step's name) -> what the line says
PHASE_WORDS = {
    "start": "starting",
    "lock": "waiting for the lock",
    "inspect": "inspecting the dump",
    "preflight": "checking",
    "leftover": "dropping a leftover",
    "stage": "staging",
    "verify": "verifying",
    "staged": "staged",
    "switch": "switching",
    "rename": "renaming",
    "prune": "dropping old copies",
    "done": "done",
    "failed": "failed",
}
EVERY = 1.0  # seconds between writes while the restore runs

# pg_restore -v, with LC_MESSAGES=C: one worker's line may be cut into by another's, so search, never match
_FINISHED = re.compile(r"finished item \d+ (TABLE DATA|INDEX|CONSTRAINT) ")
_STARTED = re.compile(r'(processing data for table|creating (?:INDEX|CONSTRAINT|[A-Z][A-Z ]*[A-Z])) "')
_TOC_LINE = re.compile(r"^\d+;\s+\d+\s+\d+\s+(TABLE DATA|INDEX|CONSTRAINT)\s")
_INFO = re.compile(r"^pg_restore: (?!.*(error|warning|ERROR|FATAL))")
# plain SQL as it is fed to psql
_PLAIN_COPY = re.compile(rb"^COPY\s", re.IGNORECASE)
_PLAIN_INDEX = re.compile(rb"^(CREATE\s+(UNIQUE\s+)?INDEX\s|\s*ADD\s+CONSTRAINT\s.*\b(PRIMARY\s+KEY|UNIQUE)\b)", re.I)


def progress_path(progress_dir: str, db: str) -> str:
    """The progress file of a database (any database name gives one plain file name)."""
    return os.path.join(progress_dir, quote(db, safe="") + ".json")


def toc_totals(list_output: str) -> tuple[int, int]:
    """(tables, indexes) that pg_restore -l lists: TABLE DATA entries; INDEX and CONSTRAINT (index-backed) entries."""
    tables = indexes = 0
    for line in list_output.splitlines():
        m = _TOC_LINE.match(line)
        if m:
            tables += m.group(1) == "TABLE DATA"
            indexes += m.group(1) != "TABLE DATA"
    return tables, indexes


def read_bytes(pids: list[int]) -> int:
    """Bytes read so far by these processes and their children (pg_restore's parallel workers)."""
    total = 0
    for pid in pids:
        for p in [pid, *_children(pid)]:
            try:
                with open(f"/proc/{p}/io") as f:
                    total += next(int(ln.split()[1]) for ln in f if ln.startswith("rchar:"))
            except (OSError, StopIteration, ValueError):
                pass  # gone meanwhile, or not ours to read
    return total


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


class Progress:
    """What a run has done so far, written to its progress file (or kept in memory only, without one)."""

    def __init__(self, path: str | None, db: str) -> None:
        self.path = path
        self.started = time.time()
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {
            "db": db, "state": "running", "phase": "start", "pid": os.getpid(), "started_at": int(self.started),
            "tables_done": 0, "tables_total": None, "bytes_done": 0, "bytes_total": None,
            "indexes_done": 0, "indexes_total": None, "percent": 0, "copying": [], "indexing": [],
        }  # fmt: skip
        self.warnings: list[str] = []
        self.reader_pids: list[int] = []  # tool processes whose reads are the dump's bytes
        self.own_read: Any = None  # or a function: bytes of the dump read here (plain dumps, large tables)
        self.sampler: Any = None  # or a function: the server's progress views, as (copying, indexing)
        self.counter: Any = None  # or a function: (tables, bytes, indexes) done, when no tool reports them
        self.parallel = False
        self._current = ""  # serial pg_restore: the item in work ("data" or "index")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.active = False

    def start(self) -> None:
        """From now on the file is ours: the run holds the database's restore lock (a second run of the same
        database, refused by the lock, never overwrites the progress of the one that runs)."""
        if self.path and not self.active:
            self.active = True
            self._thread = threading.Thread(target=self._loop, name="pgops-progress", daemon=True)
            self._thread.start()
            self.write()

    # --- what the run reports ---------------------------------------------------------------

    def phase(self, name: str) -> None:
        with self.lock:
            self.data["phase"] = name
        self.write()

    def totals(self, tables: int | None, indexes: int | None, dump_bytes: int | None) -> None:
        with self.lock:
            self.data.update(tables_total=tables, indexes_total=indexes, bytes_total=dump_bytes)
            self.data.update(tables_done=0, indexes_done=0, bytes_done=0)
        self.write()

    def tool_line(self, line: str) -> None:
        """A line of pg_restore -v: count what it finished."""
        with self.lock:
            if self.parallel:
                for kind in _FINISHED.findall(line):
                    self._count("data" if kind == "TABLE DATA" else "index")
                return
            m = _STARTED.search(line)
            if m:  # serial: an item starts when the one before it finished
                self._count(self._current)
                what = m.group(1)
                self._current = ("data" if what.startswith("processing")
                                 else "index" if what in ("creating INDEX", "creating CONSTRAINT") else "")  # fmt: skip

    def plain_chunk(self, line: bytes, in_copy: bool) -> None:
        """A line of a plain dump going to psql: a COPY's end is a table loaded, an index statement an index."""
        with self.lock:
            if in_copy and line.rstrip(b"\r\n") == b"\\.":
                self._count("data")
            elif not in_copy and _PLAIN_INDEX.match(line):
                self._count("index")

    def table_loaded(self) -> None:
        """A table loaded outside pg_restore (a large one, by several COPY sessions)."""
        with self.lock:
            self._count("data")

    def loaded(self) -> None:
        """The tool finished without error: everything it had to load is loaded."""
        with self.lock:
            self._current = ""
            for kind in ("tables", "indexes", "bytes"):
                if self.data[f"{kind}_total"] is not None:
                    self.data[f"{kind}_done"] = self.data[f"{kind}_total"]
            self.reader_pids, self.own_read, self.sampler, self.counter = [], None, None, None
            self.data.update(copying=[], indexing=[])
        self.write()

    def _count(self, kind: str) -> None:
        key = {"data": "tables_done", "index": "indexes_done"}.get(kind)
        if key:
            self.data[key] += 1

    def finish(self, failed: bool, result: dict[str, Any]) -> None:
        """The run ended: the last state, with what a status page shows of the result."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self.lock:
            self.data.update(state="failed" if failed else "done", phase="failed" if failed else "done",
                             copying=[], indexing=[])  # fmt: skip
            self.data["result"] = {k: result.get(k) for k in ("changed", "staged", "previous_db", "switch_window_ms",
                                                              "terminated_count", "checksum_by", "msg")}  # fmt: skip
        self.write()

    # --- writing ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            data = dict(self.data)
        data["elapsed_s"] = round(time.time() - self.started, 1)
        data["updated_at"] = int(time.time())
        done, total = data["bytes_done"], data["bytes_total"]
        if total and data["state"] == "running":  # what was read counts, but no more than the dump
            data["bytes_done"] = min(done, total)
        data["percent"] = _percent(data)
        return data

    def write(self) -> None:
        if not self.path or not self.active:
            return
        data = self.snapshot()
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".progress-", dir=directory)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f)
                os.chmod(tmp, 0o644)  # no secrets: a status page running as another user may read it
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            if not self.warnings:
                self.warnings.append(f"cannot write the progress file {self.path}: {exc.strerror}; the restore goes on")

    def _loop(self) -> None:
        while not self._stop.wait(EVERY):
            self._sample()
            self.write()

    def _sample(self) -> None:
        reader_pids, own_read, sampler, counter = self.reader_pids, self.own_read, self.sampler, self.counter
        reads = ([read_bytes(reader_pids)] if reader_pids else []) + ([own_read()] if own_read else [])
        done = sum(reads) if reads else None
        views: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None
        counts: tuple[int, int, int] | None = None
        try:
            views = sampler() if sampler is not None else None
            counts = counter() if counter is not None else None
        except Exception:  # noqa: BLE001 - progress never fails a restore; the next sample tries again
            pass
        with self.lock:
            if done is not None:  # never backwards: a tool that exited takes its count with it
                self.data["bytes_done"] = max(self.data["bytes_done"], done)
            if views is not None:
                self.data["copying"], self.data["indexing"] = views
            for key, value in zip(("tables_done", "bytes_done", "indexes_done"), counts or ()):
                self.data[key] = max(self.data[key], value)

    def close(self) -> None:
        self._stop.set()


def _percent(data: dict[str, Any]) -> int:
    """A rough share of the stage: the dump's bytes (or tables) read count 80 %, indexes built 20 %."""
    if data["state"] != "running":
        return 100 if data["state"] == "done" else data.get("percent", 0)
    parts = []
    if data["bytes_total"]:
        parts.append((0.8, data["bytes_done"] / data["bytes_total"]))
    elif data["tables_total"]:
        parts.append((0.8, data["tables_done"] / data["tables_total"]))
    if data["indexes_total"]:
        parts.append((0.2, data["indexes_done"] / data["indexes_total"]))
    if not parts:
        return 0
    share = sum(w * f for w, f in parts) / sum(w for w, _f in parts)
    return min(99, int(share * 100))


def server_views(conn: Any, version_num: int, dbname: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """What the server shows of the COPYs (14+) and index builds (12+) running in dbname (conn is into it)."""
    copying: list[dict[str, Any]] = []
    indexing: list[dict[str, Any]] = []
    if version_num >= 140000:
        rows = conn.execute(
            "SELECT p.relid::regclass::text, p.bytes_processed, p.tuples_processed "
            "FROM pg_catalog.pg_stat_progress_copy p WHERE p.datname = %s ORDER BY 1",
            (dbname,),
        ).fetchall()
        copying = [{"table": r[0], "bytes": int(r[1] or 0), "rows": int(r[2] or 0)} for r in rows]
    if version_num >= 120000:
        rows = conn.execute(
            "SELECT p.index_relid::regclass::text, p.relid::regclass::text, p.phase, p.blocks_done, p.blocks_total "
            "FROM pg_catalog.pg_stat_progress_create_index p WHERE p.datname = %s ORDER BY 1",
            (dbname,),
        ).fetchall()
        indexing = [{"index": r[0], "table": r[1], "phase": r[2], "blocks_done": int(r[3] or 0),
                     "blocks_total": int(r[4] or 0)} for r in rows]  # fmt: skip
    return copying, indexing


# a database's tables (as a source refresh copies them: no temporary ones), their bytes, and their indexes
USER_TABLES = (
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
    "AND c.relpersistence <> 't' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'"
)
_COUNTS = (
    "SELECT count(*) FILTER (WHERE {done}), COALESCE(sum(pg_catalog.pg_table_size(c.oid)), 0), "
    "(SELECT count(*) FROM pg_catalog.pg_index i WHERE i.indrelid IN (SELECT c.oid " + USER_TABLES + ")) " + USER_TABLES
)


def source_totals(conn: Any) -> tuple[int, int, int]:
    """(tables, bytes, indexes) of the database conn is into: the totals of a source refresh."""
    row = conn.execute(_COUNTS.format(done="true")).fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def staged_counts(conn: Any, version_num: int, dbname: str) -> tuple[int, int, int]:
    """(tables, bytes, indexes) loaded so far into the database conn is into, as another session sees it.

    A table counts once it holds data and no COPY into it runs (pg_stat_progress_copy, 14+); its
    bytes as they grow; an index once its build committed.
    """
    done = "pg_catalog.pg_table_size(c.oid) > 0"
    if version_num >= 140000:
        done += " AND c.oid NOT IN (SELECT p.relid FROM pg_catalog.pg_stat_progress_copy p WHERE p.datname = %s)"
    row = conn.execute(_COUNTS.format(done=done), (dbname,) if version_num >= 140000 else ()).fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def list_totals(argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...]) -> tuple[int | None, int | None]:
    """(tables, indexes) from pg_restore -l of the archive; (None, None) when it cannot be listed."""
    try:
        out = subprocess.run(argv, env=env, pass_fds=pass_fds, capture_output=True, check=True, timeout=600)
    except (OSError, subprocess.SubprocessError):
        return None, None
    return toc_totals(out.stdout.decode(errors="replace"))


def is_info(line: str) -> bool:
    """A pg_restore -v line that only says what it does (left out of an error message)."""
    return bool(_INFO.match(line))


# --- reading (the role's waiting task, a status command) ---------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _of(done: int, total: int | None, what: str) -> str:
    return f"{done}/{total} {what}" if total is not None else f"{done} {what}"


def progress_line(data: dict[str, Any], elapsed_s: float | None = None) -> str:
    """hoge_db: staging 43 % — 12/40 tables, 1.2 of 2.8 GB, 4/16 indexes, 00:01:52

    elapsed_s: the reader's own count of the run's time (the file's is as old as its last write).
    """
    phase = data.get("phase", "")
    words = PHASE_WORDS.get(phase, phase)
    head = f"{data.get('db', '?')}: {words}"
    if phase == "stage":
        head += f" {data.get('percent', 0)} %"
    parts = [_of(data.get("tables_done", 0), data.get("tables_total"), "tables")]
    if data.get("bytes_total"):
        total = _size(data["bytes_total"])
        done = _size(data.get("bytes_done", 0))
        if done.split()[1] == total.split()[1]:
            done = done.split()[0]
        parts.append(f"{done} of {total}")
    parts.append(_of(data.get("indexes_done", 0), data.get("indexes_total"), "indexes"))
    elapsed = int(data.get("elapsed_s", 0) if elapsed_s is None else elapsed_s)
    parts.append(f"{elapsed // 3600:02d}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}")
    return f"{head} — " + ", ".join(parts)


def read_progress(progress_dir: str, db: str) -> dict[str, Any] | None:
    """The progress file of db, or None when there is none (yet) or it is not one of ours."""
    try:
        with open(progress_path(progress_dir, db)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("db") == db else None
