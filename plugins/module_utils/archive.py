# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A large table's rows read straight from a custom or directory archive, without pg_restore in between.

Piped out of pg_restore, a table's COPY text reaches us in 4 kB writes: on 2 cores the pipe's
wake-ups cost more CPU than the inflating. Here the archive's table of contents gives the
table's COPY line and where its data is (an offset in a custom archive, a file in a directory
one), and its data is inflated here (zlib, as pg_dump wrote it) into the caller's buffer. What
this reader does not know (format versions before 1.12, lz4 or zstd compression, a custom
archive written to a pipe, which records no offsets) goes through pg_restore.

Whoever writes the backup directory controls the archive: every length read is checked against
the file's size, a directory archive's data file is opened only by a name pg_dump gives (never
a path, never through a symlink), and no inflate step gives more than the buffer it fills.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass
from typing import IO, Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.parallel import PG_RESTORE_FIXED, dump_setting, dump_text
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError

_CUSTOM_FORMAT = 1  # the format byte of a custom archive (archCustom)
_GZIP, _NONE = 1, 0  # compression of archive versions 1.15+; before, a level (0 = none)
_OFFSET_SET = 2  # K_OFFSET_POS_SET: the data's position was recorded (the dump went to a seekable file)
_BLOCK_DATA = 1  # BLK_DATA
_READ_AHEAD = 1 << 16
_DATA_FILE = re.compile(rb"\d+\.dat")  # a table's data file in a directory archive, as pg_dump names it
_NOFOLLOW = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class NotReadableHere(Exception):
    """The archive is one pg_restore reads, not this reader."""


class _Cursor:
    """Little-endian reading of the archive's header and TOC, at the archive's int and offset sizes."""

    def __init__(self, fd: int, size: int, pos: int = 0) -> None:
        self.fd, self.size, self.pos = fd, size, pos
        self.buf, self.at = b"", pos  # buf holds the file's bytes from offset `at`
        self.int_size = self.off_size = 4
        self.version = (0, 0)

    def bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise NotReadableHere(f"a length of {n} bytes at offset {self.pos} runs past the end of the file")
        if self.pos + n > self.at + len(self.buf):
            self.buf, self.at = os.pread(self.fd, max(n, _READ_AHEAD), self.pos), self.pos
        out = self.buf[self.pos - self.at : self.pos - self.at + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.bytes(1)[0]

    def int(self) -> int:
        sign = self.byte()
        value = int.from_bytes(self.bytes(self.int_size), "little")
        return -value if sign else value

    def str(self) -> bytes | None:
        n = self.int()
        return None if n < 0 else self.bytes(n)


@dataclass
class _Entry:
    dump_id: int
    desc: bytes
    namespace: bytes | None
    tag: bytes | None
    defn: bytes | None
    copy_line: bytes | None
    data_pos: int  # custom: where the data block starts, -1 when no position was recorded
    data_file: bytes  # directory: the data file's name ("2583.dat")


class Archive:
    """The table of contents of a custom archive (fd: the file) or a directory archive (fd: the directory)."""

    def __init__(self, fd: int, directory: bool) -> None:
        self.fd, self.directory = fd, directory
        toc_fd = os.open("toc.dat", _NOFOLLOW, dir_fd=fd) if directory else fd
        try:
            self.size = os.fstat(toc_fd).st_size  # toc.dat's; of a custom archive, the whole file's (its data too)
            self._read_toc(_Cursor(toc_fd, self.size))
        finally:
            if directory:
                os.close(toc_fd)
        # the settings pg_restore starts each session with: its own, then the dump's (encoding, search_path)
        self.settings = dict(PG_RESTORE_FIXED)
        for e in self.entries:
            if e.desc not in (b"ENCODING", b"SEARCHPATH"):
                continue
            for line in (e.defn or b"").splitlines(keepends=True):
                setting = dump_setting(line)
                if setting:
                    self.settings[setting[0]] = setting[1]

    def _read_toc(self, c: _Cursor) -> None:
        if c.bytes(5) != b"PGDMP":
            raise NotReadableHere("not a pg_dump archive")
        c.version = (c.byte(), c.byte())
        c.byte()  # revision
        c.int_size, c.off_size, fmt = c.byte(), c.byte(), c.byte()
        if c.version < (1, 12) or not 1 <= c.int_size <= 8 or not 1 <= c.off_size <= 8:
            raise NotReadableHere(f"archive version {c.version[0]}.{c.version[1]}")
        compression = c.byte() if c.version >= (1, 15) else (_GZIP if c.int() else _NONE)
        if not self.directory and (fmt != _CUSTOM_FORMAT or compression not in (_GZIP, _NONE)):
            raise NotReadableHere(f"format {fmt}, compression {compression}")  # a directory's files say theirs
        self.compressed, self.int_size = compression == _GZIP, c.int_size
        for _field in range(7):  # the dump's time
            c.int()
        for _name in range(3):  # database name, server and pg_dump versions
            c.str()
        self.entries = [self._entry(c) for _i in range(c.int())]

    def _entry(self, c: _Cursor) -> _Entry:
        dump_id = c.int()
        c.int()  # had a dumper
        c.str(), c.str()  # catalog ids
        tag, desc = c.str(), c.str()
        c.int()  # section
        defn = c.str()
        c.str()  # drop statement
        copy_line, namespace = c.str(), c.str()
        c.str()  # tablespace
        if c.version >= (1, 14):
            c.str()  # table access method
        if c.version >= (1, 16):
            c.int()  # relkind
        c.str(), c.str()  # owner, "with oids"
        while c.str() is not None:  # dependencies
            pass
        pos, name = -1, b""
        if self.directory:
            name = c.str() or b""
        else:
            flag, offset = c.byte(), int.from_bytes(c.bytes(c.off_size), "little")
            pos = offset if flag == _OFFSET_SET else -1
        return _Entry(dump_id, desc or b"", namespace, tag, defn, copy_line, pos, name)

    def table_data(self, schema: str, table: str) -> TableData | None:
        """The table's data, or None when this reader cannot read it (pg_restore then does)."""
        for e in self.entries:
            if e.desc == b"TABLE DATA" and (self.text(e.namespace), self.text(e.tag)) == (schema, table):
                if not e.copy_line:
                    return None
                if self.directory:
                    return _FileData.open(self, e)
                return _ChunkData(self, e) if e.data_pos >= 0 else None
        return None

    def text(self, raw: bytes | None) -> str:
        return dump_text(raw or b"", self.settings.get("client_encoding"))


class TableData:
    """A table's COPY text (rows and pg_dump's end marker), read into whatever buffer readinto is given."""

    def __init__(self, archive: Archive, entry: _Entry) -> None:
        self.copy_line, self.settings = archive.text(entry.copy_line), archive.settings
        self.what = _what(archive, entry)

    @property
    def read(self) -> int:
        """Bytes of the archive read so far."""
        raise NotImplementedError

    def readinto(self, view: memoryview) -> int:
        """Fill view with the next bytes of COPY text, as far as they go; 0 at the end."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ChunkData(TableData):
    """A custom archive's data block: chunks of a length each, inflated as one zlib stream."""

    def __init__(self, archive: Archive, entry: _Entry) -> None:
        super().__init__(archive, entry)
        self.c = _Cursor(archive.fd, archive.size, entry.data_pos)
        self.c.int_size = archive.int_size
        self.inflate = zlib.decompressobj() if archive.compressed else None
        self.pending = b""  # compressed bytes read, not yet given to inflate
        self.left = 0  # bytes of the current chunk not read yet
        self.ended = False
        try:
            kind, dump_id = self.c.byte(), self.c.int()
        except NotReadableHere as exc:
            raise _unreadable(self.what, exc) from exc
        if kind != _BLOCK_DATA or dump_id != entry.dump_id:
            raise _unreadable(self.what, f"no data block of entry {entry.dump_id} at offset {entry.data_pos}")
        self.start = self.c.pos

    @property
    def read(self) -> int:
        return self.c.pos - self.start

    def readinto(self, view: memoryview) -> int:
        filled = 0
        try:
            while filled < len(view):
                space = view[filled:]
                if self.inflate is not None and (self.pending or self.inflate.unconsumed_tail):
                    data = self.inflate.decompress(self.pending or self.inflate.unconsumed_tail, len(space))
                    self.pending = b""
                elif self.left:  # chunks are small (about 4 kB): the cursor's read-ahead serves them
                    data = self.c.bytes(min(self.left, len(space)))
                    self.left -= len(data)
                    if self.inflate is not None:
                        self.pending, data = data, b""
                elif self.ended:
                    break
                else:
                    self.left = self.c.int()  # the next chunk's length; 0 ends the data
                    self.ended = self.left == 0
                    if self.ended and self.inflate is not None and not self.inflate.eof:
                        raise NotReadableHere("its compressed data ends early")
                    data = b""
                space[: len(data)] = data
                filled += len(data)
        except (NotReadableHere, zlib.error) as exc:
            raise _unreadable(self.what, exc) from exc
        return filled


class _FileData(TableData):
    """A directory archive's data file: 2583.dat as it is, or 2583.dat.gz (gzip), as pg_restore looks for them."""

    @classmethod
    def open(cls, archive: Archive, entry: _Entry) -> _FileData | None:
        if not _DATA_FILE.fullmatch(entry.data_file):
            return None  # not a name pg_dump gives: pg_restore says what it makes of it
        for suffix, gz in ((b"", False), (b".gz", True)):
            try:
                fd = os.open(entry.data_file + suffix, _NOFOLLOW, dir_fd=archive.fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _unreadable(_what(archive, entry), exc) from exc
            return cls(archive, entry, os.fdopen(fd, "rb"), gz)
        return None  # 2583.dat.lz4, .zst: pg_restore reads them

    def __init__(self, archive: Archive, entry: _Entry, file: IO[bytes], gz: bool) -> None:
        super().__init__(archive, entry)
        self.file = file
        self.stream: Any = gzip.GzipFile(fileobj=file, mode="rb") if gz else file
        self.done = 0  # the file's bytes read, as of the last readinto (the progress thread reads it)

    @property
    def read(self) -> int:
        return self.done

    def readinto(self, view: memoryview) -> int:
        filled = 0
        try:
            while filled < len(view):
                got = self.stream.readinto(view[filled:])
                if not got:
                    break
                filled += got
            self.done = self.file.tell()
        except (OSError, EOFError, zlib.error) as exc:
            raise _unreadable(self.what, exc) from exc
        return filled

    def close(self) -> None:
        self.stream.close()
        self.file.close()


def _what(archive: Archive, entry: _Entry) -> str:
    return f"{archive.text(entry.namespace)}.{archive.text(entry.tag)}"


def _unreadable(what: str, why: object) -> PgOpsError:
    return PgOpsError(
        f"the dump's data of table {what} cannot be read: {why}; "
        "pg_restore --data-only -f /dev/null DUMP shows whether pg_restore can read it"
    )
