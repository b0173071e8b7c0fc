# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a dump is (by content, never by file name), its fingerprint, and reading plain SQL dumps.

Plain dumps are streamed through a filter that drops the dump's own CREATE/DROP/ALTER DATABASE
and \\connect lines (pg_dump -C, or hand-made files such as chinook): run against a staging
database they would act on other databases of the server.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError

ARCHIVE_FORMATS = ("custom", "directory", "tar")
PLAIN_FORMATS = ("plain", "plain.gz", "plain.zst", "plain.lz4")

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_LZ4_MAGIC = b"\x04\x22\x4d\x18"
_DECOMPRESSORS = {"plain.zst": "zstd", "plain.lz4": "lz4"}
_SQL_START = re.compile(
    rb"^\s*(--|/\*|SET\s|SELECT\s|CREATE\s|DROP\s|ALTER\s|BEGIN|START\s|COMMENT\s|INSERT\s|COPY\s|\\)",
    re.IGNORECASE | re.MULTILINE,
)
_DB_STATEMENT = re.compile(r"^\s*(CREATE|DROP|ALTER)\s+DATABASE\b", re.IGNORECASE)
_CONNECT = re.compile(r"^\s*\\(c|connect)(\s|$)")
COPY_FROM_STDIN = re.compile(r"^\s*COPY\s.*\bFROM\s+stdin\b.*;\s*$", re.IGNORECASE)
# pg_dump 17.6+ wraps plain dumps in \restrict KEY … \unrestrict KEY; we put our own key around the whole load
_RESTRICT = re.compile(r"^\s*\\(restrict|unrestrict)(\s|$)")


class DumpSource:
    """A dump opened once: sniffing, hashing and loading all read this one open file.

    Whoever writes the backup directory cannot swap the file between the hash and the load:
    child tools read it as /dev/fd/N, and unchanged() fails if it was written meanwhile.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.toc: str | None = None  # pg_restore -l of an archive, once read (load.check_readable)
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags | (os.O_DIRECTORY if os.path.isdir(path) else 0))
        except FileNotFoundError as exc:
            raise PgOpsError(f"dump {path!r} does not exist") from exc
        except OSError as exc:
            raise PgOpsError(f"cannot read dump {path!r}: {exc.strerror}") from exc
        self.is_dir = stat.S_ISDIR(os.fstat(self.fd).st_mode)
        self.identity = self._identity()
        try:
            self.format = self._sniff()
        except BaseException:
            self.close()
            raise
        self.size = sum(entry[2] for entry in self.identity)  # (name, inode, size, ...)

    # --- identity and format ----------------------------------------------------------------

    def members(self) -> list[str]:
        """File names of a directory dump, in name order (empty for a file)."""
        return sorted(os.listdir(self.fd)) if self.is_dir else []

    def _identity(self) -> list[tuple[str, int, int, int, int, int]]:
        """(name, inode, size, mtime, ctime, device) of the file, or of each file of a directory dump."""

        def ident(st: os.stat_result, name: str) -> tuple[str, int, int, int, int, int]:
            return (name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev)

        if not self.is_dir:
            return [ident(os.fstat(self.fd), "")]
        return [ident(os.stat(n, dir_fd=self.fd, follow_symlinks=False), n) for n in self.members()]

    @property
    def identity_key(self) -> str:
        """The file's identity as recorded with a restore: device, inode, size, mtime and ctime (ns), per file.

        Equal keys mean the very same file, untouched since: writing it changes mtime and ctime, and
        nobody can set a ctime back (an in-place rewrite with the mtime put back is still noticed).
        Computed from the stat taken when the dump was opened, before anything read it.
        """
        files = [[dev, ino, size, mtime, ctime, name] for name, ino, size, mtime, ctime, dev in self.identity]
        return json.dumps(files, separators=(",", ":"))

    def unchanged(self, sha256: str) -> None:
        """Fail if what was loaded may differ from what was hashed.

        Size, mtime or (for a directory dump) a member's inode differ: changed. Only the ctime
        differs (the file was renamed over or touched, or written with its mtime put back): the
        bytes are hashed again.
        """
        now = self._identity()
        if [i[:4] for i in now] != [i[:4] for i in self.identity] or (
            now != self.identity and self.fingerprint() != sha256
        ):
            raise PgOpsError(
                f"dump {self.path!r} changed while it was being restored: restore it again when it is complete"
            )

    def _sniff(self) -> str:
        """Format by content: PGDMP magic, toc.dat, ustar with toc.dat, plain SQL, or compressed plain SQL."""
        path = self.path
        if self.is_dir:
            if "toc.dat" not in self.members():
                raise PgOpsError(f"dump {path!r} is a directory without toc.dat: not a pg_dump directory-format dump")
            return "directory"
        head = os.pread(self.fd, 4096, 0)
        if not head:
            raise PgOpsError(f"dump {path!r} is empty")
        if head.startswith(b"PGDMP"):
            return "custom"
        if len(head) >= 262 and head[257:262] == b"ustar":
            if head[:100].rstrip(b"\0") != b"toc.dat":
                raise PgOpsError(f"dump {path!r} is a tar file but not a pg_dump tar-format dump (no toc.dat first)")
            return "tar"
        for magic, fmt in ((_GZIP_MAGIC, "plain.gz"), (_ZSTD_MAGIC, "plain.zst"), (_LZ4_MAGIC, "plain.lz4")):
            if head.startswith(magic):
                with self.plain_stream(fmt) as stream:
                    inner = stream.read(4096)
                if not _looks_like_sql(inner):
                    raise PgOpsError(f"dump {path!r} is {fmt.split('.')[1]}-compressed but does not hold plain SQL")
                return fmt
        if _looks_like_sql(head):
            return "plain"
        raise PgOpsError(
            f"{path!r} is not a PostgreSQL dump: expected pg_dump custom (PGDMP), directory (toc.dat), tar, "
            "or plain SQL (optionally gzip/zstd/lz4 compressed)"
        )

    @property
    def is_archive(self) -> bool:
        return self.format in ARCHIVE_FORMATS

    def archive_version(self) -> tuple[int, int]:
        """The archive format version of a custom, directory or tar dump (1.16 for pg_dump 17 and 18)."""
        if self.is_dir:
            fd = os.open("toc.dat", os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=self.fd)
            try:
                head = os.pread(fd, 8, 0)
            finally:
                os.close(fd)
        else:  # a tar dump's first member, toc.dat, starts after its 512-byte header
            head = os.pread(self.fd, 8, 512 if self.format == "tar" else 0)
        return (head[5], head[6]) if head.startswith(b"PGDMP") and len(head) >= 7 else (0, 0)

    # --- reading ----------------------------------------------------------------------------

    @property
    def child_path(self) -> str:
        """The path by which a child process given pass_fds=(fd,) opens this very file."""
        return f"/dev/fd/{self.fd}"

    def plain_stream(self, fmt: str | None = None) -> IO[bytes] | _ProcessStream:
        """A binary stream of the SQL text of a plain dump, decompressing on the fly."""
        fmt = fmt or self.format
        if fmt == "plain":
            return _FdReader(self.fd)  # type: ignore[return-value]
        if fmt == "plain.gz":
            return gzip.GzipFile(fileobj=_FdReader(self.fd), mode="rb")  # type: ignore[arg-type]
        tool = _DECOMPRESSORS[fmt]
        exe = shutil.which(tool)
        if exe is None:
            raise PgOpsError(f"the dump is {tool}-compressed and the {tool} command is not installed on this host")
        # its stdin: this same file opened anew (its own read position), as zstd refuses /dev/fd links
        reopened = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            return _ProcessStream([exe, "-dc"], stdin=reopened)
        finally:
            os.close(reopened)

    def read_tar_through(self) -> None:
        """Read every member of a tar dump to its end: pg_restore loops forever on a truncated tar archive."""
        try:
            with tarfile.open(fileobj=_FdReader(self.fd), mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    data = tar.extractfile(member)
                    while data is not None and data.read(1 << 20):
                        pass
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise PgOpsError(f"dump {self.path!r} is not readable (tar format): truncated or damaged ({exc})") from exc

    def fingerprint(self) -> str:
        """sha256 of the dump's bytes (for a directory dump: of every file's name and bytes, in name order)."""
        h = hashlib.sha256()
        if not self.is_dir:
            _hash_fd(h, self.fd)
            return h.hexdigest()
        for name in self.members():
            h.update(name.encode() + b"\0")
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=self.fd)
            try:
                _hash_fd(h, fd)
            finally:
                os.close(fd)
        return h.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DumpSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hash_fd(h: Any, fd: int) -> None:
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return
        h.update(chunk)
        offset += len(chunk)


class _FdReader:
    """Reads an fd from the start by position (pread), leaving the fd's own offset alone."""

    def __init__(self, fd: int) -> None:
        self.fd, self.offset = fd, 0

    def read(self, n: int = -1) -> bytes:
        data = os.pread(self.fd, n if n >= 0 else 1 << 30, self.offset)
        self.offset += len(data)
        return data

    def close(self) -> None:
        pass

    def __enter__(self) -> _FdReader:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _looks_like_sql(data: bytes) -> bool:
    """Text that starts like SQL. Past that start any encoding: pg_dump writes the database's (LATIN1, EUC_JP…)."""
    start = _SQL_START.search(data[:4096])
    if start is None or b"\0" in data:
        return False
    try:
        data[: start.start()].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _ProcessStream:
    """stdout of a decompressor, closed (and the process reaped) with the stream."""

    def __init__(self, argv: list[str], stdin: int) -> None:
        self.proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.argv = argv

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)  # type: ignore[union-attr]

    def __enter__(self) -> _ProcessStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.proc.kill()
        self.proc.wait()

    def check(self) -> None:
        """After reading to EOF: fail if the decompressor reported a damaged input."""
        err = self.proc.stderr.read().decode(errors="replace").strip()  # type: ignore[union-attr]
        if self.proc.wait() != 0:
            raise PgOpsError(f"{self.argv[0]} could not decompress the dump: {err.splitlines()[-1:] or 'error'}")


@dataclass
class PlainFilter:
    """Streams plain SQL, dropping statements that act on other databases; COPY data passes untouched."""

    # settings the target server does not know (SET transaction_timeout from pg_dump 17+ on older servers)
    unknown_settings: tuple[str, ...] = ()
    # psql's \restrict key: sent first, so psql refuses every meta-command the dump may hold (\! runs a shell)
    restrict_key: str = ""
    dropped: list[str] = field(default_factory=list)
    # called with each line going to psql and whether it is COPY data (progress counts tables and indexes)
    watch: Any = None
    in_comment: bool = False  # inside a /* ... */ block, where "Drop database" is prose
    shifted: bool = False  # our \restrict line came before the dump's first: psql's line N is the dump's N-1

    @property
    def restrict_line(self) -> bytes:
        return f"\\restrict {self.restrict_key}\n".encode() if self.restrict_key else b""

    def lines(self, stream: IO[bytes] | _ProcessStream) -> Iterator[bytes]:
        """The lines to load, behind our \\restrict key: psql then refuses (and stops on) any meta-command in them.

        psql, not this filter, decides what is a meta-command: only it knows where quoted text ends.
        """
        restrict = self.restrict_line
        in_copy = False
        pending = b""
        while True:
            try:
                chunk = stream.read(1 << 20)
            except (EOFError, OSError, zlib.error) as exc:  # truncated or damaged compressed dump
                raise PgOpsError(f"cannot read the dump: {exc}") from exc
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                if self.watch is not None:
                    self.watch(raw, in_copy)
                in_copy, keep = self._step(raw, in_copy)
                line = raw + b"\n" if keep else b"\n"  # a left-out line stays a line: psql counts as the dump does
                if restrict:  # our key takes the place of a first comment line (pg_dump's "--"), else goes before
                    self.shifted = bool(line.strip()) and not line.startswith(b"--")
                    yield restrict
                    restrict = b""
                    if not self.shifted:
                        continue
                yield line
        yield restrict
        if pending:
            in_copy, keep = self._step(pending, in_copy)
            if keep:
                yield pending
        if isinstance(stream, _ProcessStream):
            stream.check()

    def _step(self, raw: bytes, in_copy: bool) -> tuple[bool, bool]:
        if in_copy:  # COPY data, up to its terminator: data, never commands
            return raw.rstrip(b"\r") != b"\\.", True
        text = raw.decode("utf-8", errors="replace")
        if self.in_comment or text.lstrip().startswith("/*"):
            self.in_comment = "*/" not in text[text.find("/*") + 2 :] if not self.in_comment else "*/" not in text
            return False, True
        if COPY_FROM_STDIN.match(text):
            return True, True
        if self.unknown_settings and re.match(rf"^SET ({'|'.join(self.unknown_settings)}) = ", text):
            self.dropped.append(text.strip())
            return False, False
        if _CONNECT.match(text) or _DB_STATEMENT.match(text):
            if _DB_STATEMENT.match(text) and not text.rstrip().endswith(";"):
                raise PgOpsError(
                    f"the plain dump has a multi-line database statement ({text.strip()[:60]}...) that cannot be "
                    "removed safely; dump without --create, or restore it by hand"
                )
            self.dropped.append(text.strip())
            return False, False
        if _RESTRICT.match(text):  # replaced by our own key, which the dump cannot know
            return False, False
        return False, True
