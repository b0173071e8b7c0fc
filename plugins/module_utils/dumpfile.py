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
import os
import re
import shutil
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

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
_COPY_FROM_STDIN = re.compile(r"^\s*COPY\s.*\bFROM\s+stdin\b.*;\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class DumpInfo:
    path: str
    format: str  # one of ARCHIVE_FORMATS or PLAIN_FORMATS
    size: int  # bytes on disk (all files of a directory dump)

    @property
    def is_archive(self) -> bool:
        return self.format in ARCHIVE_FORMATS


def detect_format(path: str) -> DumpInfo:
    """Format by content: PGDMP magic, toc.dat, ustar with toc.dat, plain SQL, or compressed plain SQL."""
    if not os.path.exists(path):
        raise PgOpsError(f"dump {path!r} does not exist")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "toc.dat")):
            raise PgOpsError(f"dump {path!r} is a directory without toc.dat: not a pg_dump directory-format dump")
        size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
        return DumpInfo(path, "directory", size)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise PgOpsError(f"cannot read dump {path!r}: {exc.strerror}") from exc
    size = os.path.getsize(path)
    if not head:
        raise PgOpsError(f"dump {path!r} is empty")
    if head.startswith(b"PGDMP"):
        return DumpInfo(path, "custom", size)
    if len(head) >= 262 and head[257:262] == b"ustar":
        if head[:100].rstrip(b"\0") != b"toc.dat":
            raise PgOpsError(f"dump {path!r} is a tar file but not a pg_dump tar-format dump (no toc.dat first)")
        return DumpInfo(path, "tar", size)
    for magic, fmt in ((_GZIP_MAGIC, "plain.gz"), (_ZSTD_MAGIC, "plain.zst"), (_LZ4_MAGIC, "plain.lz4")):
        if head.startswith(magic):
            with open_plain(path, fmt) as stream:
                inner = stream.read(4096)
            if not _looks_like_sql(inner):
                raise PgOpsError(f"dump {path!r} is {fmt.split('.')[1]}-compressed but does not hold plain SQL")
            return DumpInfo(path, fmt, size)
    if _looks_like_sql(head):
        return DumpInfo(path, "plain", size)
    raise PgOpsError(
        f"{path!r} is not a PostgreSQL dump: expected pg_dump custom (PGDMP), directory (toc.dat), tar, "
        "or plain SQL (optionally gzip/zstd/lz4 compressed)"
    )


def _looks_like_sql(data: bytes) -> bool:
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(data) - 4:  # only a multibyte character cut at the end is acceptable
            return False
    return bool(_SQL_START.search(data[:4096]))


class _ProcessStream:
    """stdout of a decompressor, closed (and the process reaped) with the stream."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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


def open_plain(path: str, fmt: str) -> IO[bytes] | _ProcessStream:
    """A binary stream of the SQL text of a plain dump, decompressing on the fly."""
    if fmt == "plain":
        return open(path, "rb")
    if fmt == "plain.gz":
        return gzip.open(path, "rb")
    tool = _DECOMPRESSORS[fmt]
    exe = shutil.which(tool)
    if exe is None:
        raise PgOpsError(f"the dump is {tool}-compressed and the {tool} command is not installed on this host")
    return _ProcessStream([exe, "-dc", "--", path])


@dataclass
class PlainFilter:
    """Streams plain SQL, dropping statements that act on other databases; COPY data passes untouched."""

    # settings the target server does not know (SET transaction_timeout from pg_dump 17+ on older servers)
    unknown_settings: tuple[str, ...] = ()
    dropped: list[str] = field(default_factory=list)
    in_comment: bool = False  # inside a /* ... */ block, where "Drop database" is prose

    def lines(self, stream: IO[bytes] | _ProcessStream) -> Iterator[bytes]:
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
                line = raw + b"\n"
                in_copy, keep = self._step(raw, in_copy)
                if keep:
                    yield line
        if pending:
            in_copy, keep = self._step(pending, in_copy)
            if keep:
                yield pending
        if isinstance(stream, _ProcessStream):
            stream.check()

    def _step(self, raw: bytes, in_copy: bool) -> tuple[bool, bool]:
        if in_copy:
            return raw.rstrip(b"\r") != b"\\.", True
        text = raw.decode("utf-8", errors="replace")
        if self.in_comment or text.lstrip().startswith("/*"):
            self.in_comment = "*/" not in text[text.find("/*") + 2 :] if not self.in_comment else "*/" not in text
            return False, True
        if _COPY_FROM_STDIN.match(text):
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
        return False, True


def fingerprint(info: DumpInfo) -> str:
    """sha256 of the dump's bytes (for a directory dump: of every file's name and bytes, in name order)."""
    h = hashlib.sha256()
    paths = [info.path]
    if info.format == "directory":
        paths = [os.path.join(info.path, n) for n in sorted(os.listdir(info.path))]
    for p in paths:
        if info.format == "directory":
            h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
