# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A large table's rows read straight from a custom-format archive, without pg_restore in between.

Piped out of pg_restore, a table's COPY text reaches us in 4 kB writes: on 2 cores the pipe's
wake-ups cost more CPU than the inflating. Here the archive's table of contents gives the
table's COPY line and where its data starts; its chunks are inflated here (zlib, as pg_dump
wrote them) into the caller's buffer. Archives this reader does not know (format versions
before 1.12, lz4 or zstd compression, data without a recorded offset) go through pg_restore.

Whoever writes the backup directory controls the archive: every length read is checked
against the file's size, and no inflate step gives more than the buffer it fills.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

from ansible_collections.pgops.dbrestore.plugins.module_utils.parallel import PG_RESTORE_FIXED, dump_setting, dump_text
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import PgOpsError

_PGDMP_CUSTOM = 1  # the format byte of a custom archive (archCustom)
_GZIP, _NONE = 1, 0  # compression of archive versions 1.15+; before, a level (0 = none)
_OFFSET_SET = 2  # K_OFFSET_POS_SET: the data's position was recorded (the dump went to a seekable file)
_BLOCK_DATA = 1  # BLK_DATA
_TOC_CHUNK = 1 << 16


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
            self.buf, self.at = os.pread(self.fd, max(n, _TOC_CHUNK), self.pos), self.pos
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
    data_pos: int  # -1 when no position was recorded


class CustomArchive:
    """The table of contents of a custom-format archive, read from its open file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        c = _Cursor(fd, self.size)
        if c.bytes(5) != b"PGDMP":
            raise NotReadableHere("not a custom-format archive")
        c.version = (c.byte(), c.byte())
        c.byte()  # revision
        c.int_size, c.off_size, fmt = c.byte(), c.byte(), c.byte()
        if c.version < (1, 12) or fmt != _PGDMP_CUSTOM or not 1 <= c.int_size <= 8 or not 1 <= c.off_size <= 8:
            raise NotReadableHere(f"archive version {c.version[0]}.{c.version[1]}, format {fmt}")
        compression = c.byte() if c.version >= (1, 15) else (_GZIP if c.int() else _NONE)
        if compression not in (_GZIP, _NONE):
            raise NotReadableHere("lz4 or zstd compression")
        self.compressed = compression == _GZIP
        for _field in range(7):  # the dump's time
            c.int()
        for _name in range(3):  # database name, server and pg_dump versions
            c.str()
        self.entries = [self._entry(c) for _i in range(c.int())]
        self.int_size = c.int_size
        # the settings pg_restore starts each session with: its own, then the dump's (encoding, search_path)
        self.settings = dict(PG_RESTORE_FIXED)
        for e in self.entries:
            for line in (e.defn or b"").splitlines(keepends=True) if e.desc in (b"ENCODING", b"SEARCHPATH") else ():
                setting = dump_setting(line)
                if setting:
                    self.settings[setting[0]] = setting[1]

    @staticmethod
    def _entry(c: _Cursor) -> _Entry:
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
        flag = c.byte()
        pos = int.from_bytes(c.bytes(c.off_size), "little")
        return _Entry(dump_id, desc or b"", namespace, tag, defn, copy_line, pos if flag == _OFFSET_SET else -1)

    def table_data(self, schema: str, table: str) -> TableData | None:
        """The table's data, or None when this reader cannot read it (pg_restore then does)."""
        for e in self.entries:
            if e.desc == b"TABLE DATA" and (self.text(e.namespace), self.text(e.tag)) == (schema, table):
                return TableData(self, e) if e.data_pos >= 0 and e.copy_line else None
        return None

    def text(self, raw: bytes | None) -> str:
        return dump_text(raw or b"", self.settings.get("client_encoding"))


class TableData:
    """A table's COPY text, inflated from the archive's chunks into whatever buffer readinto is given."""

    def __init__(self, archive: CustomArchive, entry: _Entry) -> None:
        self.copy_line, self.settings = archive.text(entry.copy_line), archive.settings
        self.what = f"{archive.text(entry.namespace)}.{archive.text(entry.tag)}"
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
        """Bytes of the archive read so far."""
        return self.c.pos - self.start

    def readinto(self, view: memoryview) -> int:
        """Fill view with the next bytes of COPY text, as far as they go; 0 at the end."""
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


def _unreadable(what: str, why: object) -> PgOpsError:
    return PgOpsError(
        f"the dump's data of table {what} cannot be read: {why}; "
        "pg_restore --data-only -f /dev/null DUMP shows whether pg_restore can read it"
    )
