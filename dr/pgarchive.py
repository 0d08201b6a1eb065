"""Reading an uncompressed pg_dump custom-format archive as a stream.

A parallel `pg_restore -j` needs the archive as a seekable file: restoring a stored backup that
way means writing the whole decompressed archive to local disk before the first row is loaded
(0.8x the database size, serially). This module reads the archive once, as it arrives, so that
`dr.loader` can load the rows while the backup is still being read, with every connection:

- `read_head` parses the header and the table of contents (TOC), which pg_dump writes before any
  data when it writes to a pipe, and returns them with the raw bytes they took: those bytes alone
  are a valid archive without data, from which `pg_restore -L` restores the schema and everything
  after the data.
- `ArchiveStream.blocks` then yields each table's COPY rows, block by block.

Only what `pg_dump --format=custom --compress=0` writes is read here (archive versions 1.12 to
1.16, pg_dump 9.6 to 18); anything else (compressed data, large objects, INSERT-style data, a
newer version) is reported as unsupported so the caller can fall back to `pg_restore` of a file.

The layout follows PostgreSQL's `pg_backup_archiver.c` (`ReadHead`, `ReadToc`, `ReadInt`,
`ReadStr`, `ReadOffset`) and `pg_backup_custom.c` (`_readBlockHeader`, `_CustomReadFunc`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Iterator

#: TOC sections (pg_backup.h, teSection)
SECTION_NONE, SECTION_PRE_DATA, SECTION_DATA, SECTION_POST_DATA = 1, 2, 3, 4
#: data block types (pg_backup_archiver.h)
BLK_DATA, BLK_BLOBS = 1, 3
#: archive versions we read: (major, minor); 1.12 is pg_dump 9.6, 1.16 pg_dump 17 and 18
MIN_VERSION, MAX_VERSION = (1, 12), (1, 16)
#: entries pg_restore restores in its ACL pass or after it (`_tocEntryRestorePass`)
_ACL_PASS = ("ACL", "ACL LANGUAGE", "DEFAULT ACL")
_POST_ACL_PASS = ("EVENT TRIGGER", "MATERIALIZED VIEW DATA")
#: a data chunk's length as pg_dump writes it with 4-byte ints: sign byte, little-endian value
_CHUNK_HEADER = struct.Struct("<BI")


class ArchiveFormatError(ValueError):
    """The bytes are not a custom-format archive as pg_dump writes it (damaged or truncated)."""


@dataclass(frozen=True)
class TocEntry:
    dump_id: int
    had_dumper: bool
    tag: str | None
    desc: str | None
    section: int
    defn: str | None
    copy_stmt: str | None
    namespace: str | None
    #: dump ids of the entries this one depends on (as pg_dump recorded them)
    deps: tuple[int, ...] = ()

    def restore_pass(self) -> int:
        """0 main, 1 ACL, 2 after the ACLs (as pg_restore orders them)."""
        if self.desc in _ACL_PASS:
            return 1
        if self.desc in _POST_ACL_PASS:
            return 2
        if self.desc in ("COMMENT", "SECURITY LABEL") and (self.tag or "").startswith(("EVENT TRIGGER ", "MATERIALIZED VIEW ")):
            return 2
        return 0


@dataclass
class ArchiveHead:
    version: tuple[int, int, int]
    int_size: int
    off_size: int
    compressed: bool
    entries: list[TocEntry]
    raw: bytes = field(repr=False)
    #: the versions the header records: the server dumped ("15.18") and pg_dump's ("15.18"), archive 1.10+
    server_version: str | None = None
    dump_version: str | None = None

    def unsupported(self) -> str | None:
        """Why the rows of this archive cannot be loaded from the stream, or None."""
        if not MIN_VERSION <= self.version[:2] <= MAX_VERSION:
            return f"archive version {'.'.join(map(str, self.version))}"
        if self.int_size != 4:
            return f"{self.int_size}-byte integers"
        if self.compressed:
            return "the archive's data is compressed by pg_dump"
        for e in self.entries:
            if e.had_dumper and not (e.desc == "TABLE DATA" and e.copy_stmt):
                return f"entry {e.dump_id} ({e.desc} {e.tag}) has data that is not COPY rows"
        return None

    def table_data(self) -> dict[int, TocEntry]:
        """The entries whose rows come in data blocks, by dump id."""
        return {e.dump_id: e for e in self.entries if e.had_dumper and e.desc == "TABLE DATA"}

    def phases(self) -> tuple[list[TocEntry], list[TocEntry]]:
        """The entries to restore before the rows (schema) and after them (the rest), in TOC order.

        Before: the pre-data section and the comments and other section-less entries that follow
        its objects, except what pg_restore restores in its ACL passes (so that the rows are
        loaded before any privilege is revoked). After: everything else but the rows.
        """
        before, after = [], []
        current = SECTION_PRE_DATA
        for e in self.entries:
            if e.section != SECTION_NONE:
                current = e.section
            if e.had_dumper and e.desc == "TABLE DATA":
                continue
            if current == SECTION_PRE_DATA and e.section in (SECTION_NONE, SECTION_PRE_DATA) and e.restore_pass() == 0:
                before.append(e)
            else:
                after.append(e)
        return before, after


class ArchiveStream:
    """Bytes of an archive arriving in chunks (any sizes), read as pg_dump's archiver reads them."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._buf = b""
        self._pos = 0
        self._raw: list[bytes] | None = None  # recording the head's bytes
        self._int_size = 4  # as the header says, once read
        self.head: ArchiveHead | None = None
        self.consumed = 0

    # -- low level

    def _more(self) -> bool:
        """Append the next chunk to the unread bytes; False at the end of the stream."""
        for chunk in self._chunks:
            if chunk:
                rest = self._buf[self._pos:]
                if self._raw is not None and self._pos:
                    self._raw.append(self._buf[:self._pos])
                self.consumed += self._pos
                self._buf, self._pos = rest + chunk, 0
                return True
        return False

    def _read(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n:
            if not self._more():
                raise ArchiveFormatError(f"archive ends early: {n} bytes wanted at byte {self.consumed + self._pos}")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def _byte(self) -> int:
        return self._read(1)[0]

    def _int(self) -> int:
        size = self._int_size
        raw = self._read(1 + size)
        value = int.from_bytes(raw[1:], "little")
        return -value if raw[0] else value

    def _str(self) -> str | None:
        n = self._int()
        if n < 0:
            return None
        if n > 1 << 30:
            raise ArchiveFormatError(f"implausible string length {n}")
        return self._read(n).decode("utf-8", "replace")

    def rest(self) -> Iterator[bytes]:
        """The bytes not read yet (after `read_head`: the data blocks), as they arrive."""
        if self._pos < len(self._buf):
            yield self._buf[self._pos:]
        self._buf, self._pos = b"", 0
        yield from self._chunks

    def at_end(self) -> bool:
        return len(self._buf) - self._pos == 0 and not self._more()

    # -- the header and the TOC

    def read_head(self) -> ArchiveHead:
        self._raw = []
        if self._read(5) != b"PGDMP":
            raise ArchiveFormatError("not a custom-format archive (no PGDMP magic)")
        vmaj, vmin = self._byte(), self._byte()
        vrev = self._byte() if (vmaj, vmin) > (1, 0) else 0
        version = (vmaj, vmin, vrev)
        if version[:2] < (1, 7):
            raise ArchiveFormatError(f"archive version {vmaj}.{vmin} is too old")
        self._int_size = self._byte()
        off_size = self._byte()
        fmt = self._byte()
        if fmt != 1:  # archCustom
            raise ArchiveFormatError(f"archive format {fmt} is not custom")
        if version[:2] >= (1, 15):
            compressed = self._byte() != 0  # PG_COMPRESSION_NONE
        else:
            compressed = self._int() not in (0,)  # zlib level; 0 = none (-1 is the default level)
        for _ in range(7):  # creation time
            self._int()
        self._str()  # database name
        server_version = dump_version = None
        if version[:2] >= (1, 10):
            server_version, dump_version = self._str(), self._str()
        count = self._int()
        if not 0 <= count < 10_000_000:
            raise ArchiveFormatError(f"implausible TOC size {count}")
        entries = []
        for _ in range(count):
            entries.append(self._toc_entry(version, off_size))
        self._raw.append(self._buf[:self._pos])
        raw = b"".join(self._raw)
        self._raw = None
        self.head = ArchiveHead(version, self._int_size, off_size, compressed, entries, raw, server_version, dump_version)
        return self.head

    def _toc_entry(self, version: tuple[int, int, int], off_size: int) -> TocEntry:
        v = version[:2]
        dump_id = self._int()
        had_dumper = bool(self._int())
        self._str(), self._str()  # table oid, oid
        tag, desc = self._str(), self._str()
        section = self._int() if v >= (1, 11) else SECTION_NONE
        defn = self._str()
        self._str()  # drop statement
        copy_stmt = self._str()
        namespace = self._str()
        self._str()  # tablespace
        if v >= (1, 14):
            self._str()  # table access method
        if v >= (1, 16):
            self._int()  # relkind
        self._str()  # owner
        self._str()  # "false": WITH OIDS
        deps = []
        while (dep := self._str()) is not None:
            if not dep.isdigit():
                raise ArchiveFormatError(f"entry {dump_id} has a dependency that is not a dump id: {dep[:20]!r}")
            deps.append(int(dep))
        self._byte()  # data offset flag (custom format's extra TOC data)
        self._read(off_size)
        return TocEntry(dump_id, had_dumper, tag, desc, section, defn, copy_stmt, namespace, tuple(deps))

    # -- the data

    def blocks(self) -> Iterator[tuple[int, Iterator[bytes]]]:
        """Each table's data block as (dump id, its bytes in pieces); a block's pieces must be
        consumed before the next block is asked for.

        Stops after the last table's block: what follows is not read (pg_dump writing to a
        seekable standard output leaves a copy of the TOC there, which pg_restore never reads
        either); `rest` drains it. Raises `ArchiveFormatError` if a table's block is missing.
        """
        assert self.head is not None, "read_head first"
        wanted = set(self.head.table_data())
        while wanted:
            if self.at_end():
                raise ArchiveFormatError(f"the archive ends without the rows of {len(wanted)} table(s)")
            kind = self._byte()
            dump_id = self._int()
            if kind != BLK_DATA or dump_id not in wanted:
                raise ArchiveFormatError(f"unexpected data block (type {kind}, dump id {dump_id})")
            wanted.discard(dump_id)
            yield dump_id, self._pieces_of_block()

    def _pieces_of_block(self) -> Iterator[bytes]:
        """The data of one block, one piece per buffer of the stream.

        pg_dump writes one length-prefixed chunk per COPY row: this loop is the hot path of a
        restore, so it reads the lengths straight from the buffer and joins a buffer's rows at once.
        """
        header = _CHUNK_HEADER
        size = header.size
        while True:
            buf, pos = self._buf, self._pos
            end = len(buf)
            view = memoryview(buf)
            parts = []
            done = False
            while pos + size <= end:
                negative, n = header.unpack_from(buf, pos)
                if negative:
                    raise ArchiveFormatError(f"negative chunk length at byte {self.consumed + pos}")
                if n == 0:
                    pos += size
                    done = True
                    break
                if pos + size + n > end:
                    break
                parts.append(view[pos + size:pos + size + n])
                pos += size + n
            progressed = pos != self._pos
            self._pos = pos
            if parts:
                piece = b"".join(parts)
                del parts
                view.release()
                yield piece
            else:
                view.release()
            if done:
                return
            if not progressed and not self._more():
                raise ArchiveFormatError("archive ends inside a data block")
