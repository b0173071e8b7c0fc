# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running the PostgreSQL client tools (pg_restore, psql) as argument lists, never through a shell."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import Any, Dict, List, Tuple

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError, psycopg


def dies_with_us(argv: list[str]) -> list[str]:
    """Prefix setpriv --pdeathsig so a killed module leaves no orphan tool writing into staging."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


def find_tool(name: str, bindir: str | None) -> str:
    path = os.path.join(bindir, name) if bindir else shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        where = f"in {bindir}" if bindir else "on PATH"
        raise PgOpsError(f"{name} not found {where}: install the PostgreSQL client tools or set bindir")
    return path


def tail(text: str, lines: int = 3) -> str:
    useful = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(useful[-lines:]) or "no error output"


def run_tool(
    argv: list[str],
    env: dict[str, str],
    feed: Any = None,
    pass_fds: tuple[int, ...] = (),
    *,
    on_start: Callable[[int], None] | None = None,
    on_line: Callable[[str], None] | None = None,
    is_info: Callable[[str], bool] | None = None,
) -> None:
    """Run a client tool as an argv list; feed (an iterator of bytes) goes to its stdin.

    on_start gets the tool's pid; on_line each line of its stderr as it comes (its verbose
    output), of which the lines is_info says only tell what it does stay out of an error message.
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            dies_with_us(argv),
            stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if on_line is not None else err,
            env=env,
            pass_fds=pass_fds,
        )
        if on_start is not None:
            on_start(proc.pid)
        reader = None
        if on_line is not None:
            reader = threading.Thread(target=_read_lines, args=(proc.stderr, err, on_line, is_info), daemon=True)
            reader.start()
        feed_error: PgOpsError | None = None
        if feed is not None:
            try:
                for chunk in feed:
                    proc.stdin.write(chunk)  # type: ignore[union-attr]
            except BrokenPipeError:
                pass  # the tool stopped on an error: its exit status and stderr tell why
            except PgOpsError as exc:
                feed_error = exc
                proc.kill()
            finally:
                try:
                    proc.stdin.close()  # type: ignore[union-attr]
                except BrokenPipeError:
                    pass
        code = proc.wait()
        if reader is not None:
            reader.join()
        err.seek(0)
        message = err.read().decode(errors="replace")
    if feed_error is not None:  # the real cause: the tool was stopped because its input failed
        raise feed_error
    if code != 0:
        raise PgOpsError(f"{os.path.basename(argv[0])} exited with {code}: {tail(message)}")


def _read_lines(stream: Any, keep: Any, on_line: Callable[[str], None], is_info: Callable[[str], bool] | None) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        try:
            on_line(line)
        except Exception:  # noqa: BLE001 - watching the output never stops the tool; its errors still count
            pass
        if is_info is None or not is_info(line):
            keep.write(raw)
    stream.close()


class ToolOutput:
    """stdout of a producing tool (pg_restore -f -) as a stream; its exit status is checked at the end."""

    def __init__(self, argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> None:
        self.argv = argv
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(dies_with_us(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.err, env=env, pass_fds=pass_fds)  # fmt: skip

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)  # type: ignore[union-attr]
        if not data and self.proc.wait() != 0:
            self.err.seek(0)
            message = self.err.read().decode(errors="replace")
            raise PgOpsError(f"{os.path.basename(self.argv[0])} exited with {self.proc.returncode}: {tail(message)}")
        return data

    def __enter__(self) -> ToolOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.err.close()


def tool_version(path: str) -> tuple[int, int]:
    """(major, minor) from --version ("pg_restore (PostgreSQL) 15.14 (Debian …)"); (0, 0) when unknown."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"\)\s+(\d+)(?:\.(\d+))?", out)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (0, 0)


# the first minor release of each major whose psql has \restrict (refuses meta-commands from a script)
_RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}


def has_restrict(version: tuple[int, int]) -> bool:
    major, minor = version
    return major >= 18 or minor >= _RESTRICT_SINCE.get(major, 1000)


def conninfo_for(dbname: str) -> str:
    """-d value naming only the database: a name with "=" must never be read as a connection string."""
    return psycopg.conninfo.make_conninfo(dbname=dbname)


# producer argv and environment, consumer argv and environment (typing's names: evaluated on Python 3.8)
PipeSpec = Tuple[List[str], Dict[str, str], List[str], Dict[str, str]]


class _Pipe:
    """producer | consumer with an OS pipe between them: the data never passes through Python."""

    def __init__(self, producer: list[str], producer_env: dict[str, str], consumer: list[str],
                 consumer_env: dict[str, str]) -> None:  # fmt: skip
        self.argv = (producer, consumer)
        self.envs = (producer_env, consumer_env)
        self.errs = (tempfile.TemporaryFile(), tempfile.TemporaryFile())
        self.procs: list[subprocess.Popen] = []

    def start_producer(self) -> None:
        self.procs.append(subprocess.Popen(dies_with_us(self.argv[0]), stdin=subprocess.DEVNULL,
                                           stdout=subprocess.PIPE, stderr=self.errs[0], env=self.envs[0]))  # fmt: skip

    def start_consumer(self) -> None:
        out = self.procs[0].stdout
        self.procs.append(subprocess.Popen(dies_with_us(self.argv[1]), stdin=out, stdout=subprocess.DEVNULL,
                                           stderr=self.errs[1], env=self.envs[1]))  # fmt: skip
        out.close()  # type: ignore[union-attr]  # the consumer's copy is the only reader: a dead one stops the producer

    def wait(self) -> str | None:
        """None when both succeeded, else what failed: the producer's error first unless it only lost its reader."""
        codes = [proc.wait() for proc in reversed(self.procs)][::-1]
        failed = [n for n, code in enumerate(codes) if code != 0]
        if len(failed) == 2 and codes[0] == -13:  # SIGPIPE: the consumer stopped first, its error is the cause
            failed = [1]
        if not failed:
            return None
        n = failed[0]
        self.errs[n].seek(0)
        message = self.errs[n].read().decode(errors="replace")
        return f"{os.path.basename(self.argv[n][0])} exited with {codes[n]}: {tail(message)}"

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()

    def close(self) -> None:
        for err in self.errs:
            err.close()


def in_threads(target: Callable[[Any], None], items: list[Any], name: str) -> None:
    """target(item) for every item, each in a thread of its own, all at once; returns when all have ended."""
    threads = [threading.Thread(target=target, args=(item,), name=name, daemon=True) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_pipes(pipes: list[PipeSpec], between: Callable[[], None] | None = None) -> None:
    """Run producer | consumer pairs at once; the first failure stops the others and is raised.

    Every producer starts before any consumer, with `between` called in the gap (a test's pause
    point: the producers are then mid-stream, blocked on a full pipe).
    """
    running = [_Pipe(*pipe) for pipe in pipes]
    errors: list[str] = []

    def watch(pipe: _Pipe) -> None:
        error = pipe.wait()
        if error is not None and not errors:
            errors.append(error)
            for other in running:
                other.kill()

    try:
        for pipe in running:
            pipe.start_producer()
        if between is not None:
            between()
        for pipe in running:
            pipe.start_consumer()
        in_threads(watch, running, "pgops-pipe")
    finally:
        for pipe in running:
            pipe.kill()
            for proc in pipe.procs:
                proc.wait()
            pipe.close()
    if errors:
        raise PgOpsError(errors[0])
