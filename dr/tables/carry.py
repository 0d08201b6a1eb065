"""What the report's comparison hands to the one-transaction apply, so that the apply does not read and
hash every row of every table again.

The comparison behind the approved report staged each replaced table's rows at T (key columns and a
row hash) and joined them with the live rows. The apply must act on exactly that comparison. Making
it again under the apply's lock costs two more full passes over every table (one on each server);
instead the comparison keeps (`carry_out`) what the apply needs, in the store beside the pack
(kind `table-comparison`):

- for a table replaced row by row: the keys that differ with their kind and row hashes (live and
  at T), and the staged columns at T of the keys that come back or are reverted;
- for a table replaced in bulk: its row count and the sum of its row hashes at T (the verification);
- the rows of needed tables that the restored rows need and the live database lacked;
- for every replaced table, what identifies its content in the comparison's snapshot: its OID, its
  files (relfilenode, partitions included) and its row count; and the snapshot's xmin.

Under its lock the apply then proves (`prove_unchanged`), with one light scan per table (no hashing,
nothing sent between servers), that the live tables are exactly as compared:

- the same tables (OID) in the same files: TRUNCATE, VACUUM FULL, CLUSTER and table rewrites give new
  files, and only a new file can hold rows written frozen;
- the same number of rows; and
- no row written by a transaction that had not ended when the comparison's snapshot was taken: an
  INSERT, an UPDATE (a new row version) or a COPY stamps each row it writes with its transaction id
  (`xmin`), and every transaction that ended after that snapshot has an id at or above the snapshot's
  xmin (and, as it committed before the apply's own snapshot, at most the apply's id).

Every row visible now was therefore committed before the comparison's snapshot and visible to it
(a row deleted as of that snapshot stays deleted); with the same count the two sets of rows are
equal. A DELETE shows in the count, unless an INSERT or UPDATE made up for it, which shows in the
xmin. The window checked is the ids from the snapshot's xmin to the apply's own id, compared modulo
2^32 as PostgreSQL stores them; a row frozen long ago whose 32-bit id happens to fall in it only
makes the proof fail. When the proof fails (or more than 2^31 ids passed, or the comparison could
not be kept), the apply compares every row again under its lock, as before, and refuses unless the
result is the approved one.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, Iterator

from psycopg import sql

from dr.platforms.base import BackupInfo, BackupStore
from dr.tables.bulk import BULK
from dr.tables.compare import H, ChangeReport, Stage, TableChanges, Work, batched, idents, rel, row_of

KIND = "table-comparison"
FORMAT_VERSION = 1
#: ids are 32 bits on disk: the proof holds while fewer than 2^31 were handed out since the comparison
MAX_XID_DISTANCE = 2 ** 31 - 1
#: parts smaller than this stay in memory
SPOOL_BYTES = 32 << 20


@dataclass
class Carried:
    """A comparison kept for the apply: `meta` (JSON) and binary COPY parts."""

    meta: dict[str, Any]
    parts: dict[str, IO[bytes]] = field(default_factory=dict)
    _zf: zipfile.ZipFile | None = None
    _file: IO[bytes] | None = None

    @contextlib.contextmanager
    def reading(self, part: str) -> Iterator[IO[bytes]]:
        if self._zf is not None:
            with self._zf.open(part) as f:
                yield f
            return
        f = self.parts[part]
        f.seek(0)
        yield f

    def close(self) -> None:
        for f in self.parts.values():
            f.close()
        if self._zf is not None:
            self._zf.close()
        if self._file is not None:
            self._file.close()

    @property
    def digests(self) -> dict[str, str]:
        return self.meta["digests"]


def _files(w: Work, table: str) -> list[int | None]:
    info = w.info(table)
    oids = [info.oid] + [w.info(p).oid for p in info.partitions]
    return [r[0] for r in w.live.execute("SELECT pg_relation_filenode(o) FROM unnest(%s::oid[]) WITH ORDINALITY u(o, i) "
                                         "ORDER BY i", (oids,)).fetchall()]


def _export(w: Work, query: sql.Composable) -> IO[bytes]:
    f = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, prefix="dr-carry-")
    with w.live.cursor() as cur, cur.copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(query)) as cp:
        for data in batched(cp):
            f.write(data)
    return f


def carry_out(w: Work, report: ChangeReport) -> Carried:
    """Keep what the apply needs from the comparison open in `w` (in its snapshot); see the module doc."""
    carried = Carried({"format": FORMAT_VERSION, "database_oid": w.cat.database_oid,
                       "snapshot_xmin": w.snapshot_xmin, "digests": report.digests(), "tables": {}, "needed": {},
                       "complete": True, "why_not": ""})
    meta = carried.meta
    for t in w.closure.replaced:
        info, ch = w.info(t), w.changes[t]
        entry: dict[str, Any] = {"oid": info.oid, "files": _files(w, t), "live_rows": ch.live_rows,
                                 "t_rows": ch.t_rows, "method": ch.method, "digest": ch.digest,
                                 "counts": dict(ch.counts), "hash": w.hashes.get(t)}
        if ch.method == BULK:
            entry["t_sum"] = list(w.t_sums[t])
        elif not info.primary_key:
            meta["complete"], meta["why_not"] = False, f"{t} has no primary key and is replaced row by row"
        else:
            d, stage, pk = w.diffs[t], w.stages[t], info.primary_key
            n = len(carried.parts)
            entry["diff"], entry["stage"], entry["stage_columns"] = f"{n}.diff", f"{n}.stage", list(stage.columns)
            carried.parts[entry["diff"]] = _export(w, sql.SQL(
                "SELECT {pk}, _dr_kind, _dr_live_h, _dr_t_h FROM {d}").format(pk=idents(pk), d=d))
            carried.parts[entry["stage"]] = _export(w, sql.SQL(
                "SELECT {c}, s.{h} FROM {s} s WHERE EXISTS (SELECT 1 FROM {d} d WHERE {dk} = {sk} "
                "AND d._dr_kind <> 'removed')").format(c=idents(stage.columns, "s"), h=sql.Identifier(H),
                                                       s=stage.name, d=d, dk=row_of(pk, "d"), sk=row_of(pk, "s")))
        meta["tables"][t] = entry
    for t in w.closure.needed:
        stage, ch = w.needed.get(t), w.changes[t]
        entry = {"digest": ch.digest, "rows": stage.rows if stage else 0, "hash": w.hashes.get(t)}
        if stage is not None:
            entry["part"], entry["columns"] = f"{len(carried.parts)}.needed", list(stage.columns)
            carried.parts[entry["part"]] = _export(w, sql.SQL("SELECT {c}, {h} FROM {s}").format(
                c=idents(stage.columns), h=sql.Identifier(H), s=stage.name))
        meta["needed"][t] = entry
    return carried


def _temp_like(w: Work, table: str, columns: list[str], extra: sql.Composable) -> sql.Identifier:
    name = w.temp("c")
    w.live.execute(sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
        name, idents(columns), w.info(table).ident))
    w.live.execute(sql.SQL("ALTER TABLE {} ").format(name) + extra)
    return name


def _load(w: Work, carried: Carried, part: str, name: sql.Identifier, columns: list[str]) -> int:
    with carried.reading(part) as src, w.live.cursor() as cur:
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(name, idents(columns))) as cp:
            while data := src.read(1 << 20):
                cp.write(data)
    w.live.execute(sql.SQL("ANALYZE {}").format(name))
    return int(w.live.execute(sql.SQL("SELECT count(*) FROM {}").format(name)).fetchone()[0])


def prove_unchanged(w: Work, carried: Carried, txid: int) -> list[str]:
    """Why the live tables may differ from the kept comparison (empty: proven the same; see the module doc).

    Runs in the apply's transaction, under its lock, whose id is `txid`.
    """
    meta = carried.meta
    if meta.get("format") != FORMAT_VERSION:
        return [f"the kept comparison has format {meta.get('format')}"]
    if not meta.get("complete"):
        return [meta.get("why_not") or "the comparison could not be kept"]
    if meta["database_oid"] != w.cat.database_oid:
        return ["the live database is not the one compared (another OID)"]
    if sorted(meta["tables"]) != sorted(w.closure.replaced) or sorted(meta["needed"]) != sorted(w.closure.needed):
        return ["the closure differs from the compared one"]
    distance = txid - int(meta["snapshot_xmin"])
    if not 0 <= distance <= MAX_XID_DISTANCE:
        return [f"{distance} transaction ids were handed out since the comparison"]
    low = int(meta["snapshot_xmin"]) % 2 ** 32
    why = []
    for t, entry in meta["tables"].items():
        info = w.info(t)
        if info.oid != entry["oid"] or _files(w, t) != entry["files"]:
            why.append(f"{t} was re-created or rewritten (TRUNCATE, VACUUM FULL, CLUSTER…)")
            continue
        rows, newer = w.live.execute(sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE mod(x.xmin::text::bigint - %s + 4294967296, 4294967296) <= %s) "
            "FROM {} x").format(rel(info)), (low, distance)).fetchone()
        if rows != entry["live_rows"]:
            why.append(f"{t} holds {rows} rows, {entry['live_rows']} when compared")
        elif newer:
            why.append(f"{t} has {newer} row(s) written since the comparison")
    return why


def load_carried(w: Work, carried: Carried) -> None:
    """Stage the kept comparison in the apply's session, as `stage_and_compare` would have (proven equal)."""
    meta = carried.meta
    for t in w.closure.order:
        m = w.closure.members[t]
        w.changes[t] = TableChanges(t, m.role, w.info(t).primary_key)
    for t, entry in meta["tables"].items():
        info, ch = w.info(t), w.changes[t]
        ch.live_rows, ch.t_rows, ch.counts = entry["live_rows"], entry["t_rows"], dict(entry["counts"])
        ch.digest, ch.method = entry["digest"], entry["method"]
        if entry.get("hash"):
            w.hashes[t] = entry["hash"]
        if ch.method == BULK:
            w.t_sums[t] = (int(entry["t_sum"][0]), entry["t_sum"][1])
            continue
        pk = list(info.primary_key)
        d = _temp_like(w, t, pk, sql.SQL("ADD COLUMN _dr_kind text, ADD COLUMN _dr_live_h bigint, "
                                         "ADD COLUMN _dr_t_h bigint"))
        _load(w, carried, entry["diff"], d, [*pk, "_dr_kind", "_dr_live_h", "_dr_t_h"])
        w.diffs[t] = d
        cols = entry["stage_columns"]
        s = _temp_like(w, t, cols, sql.SQL("ADD COLUMN {} bigint").format(sql.Identifier(H)))
        w.stages[t] = Stage(s, tuple(cols), _load(w, carried, entry["stage"], s, [*cols, H]))
        w.partial.add(t)
    for t, entry in meta["needed"].items():
        w.changes[t].digest = entry["digest"]
        if entry.get("hash"):
            w.hashes[t] = entry["hash"]
        if entry.get("part"):
            cols = entry["columns"]
            s = _temp_like(w, t, cols, sql.SQL("ADD COLUMN {} bigint").format(sql.Identifier(H)))
            w.needed[t] = Stage(s, tuple(cols), _load(w, carried, entry["part"], s, [*cols, H]))
            w.changes[t].counts["back"] = w.needed[t].rows


# --- in the store ----------------------------------------------------------------------------------------


def carried_name(service: str, env_short: str, incident: str, when: datetime) -> str:
    return f"{service}_{env_short}_{KIND}_{incident}_{when.astimezone(timezone.utc):%Y%m%dT%H%M%S%fZ}.zip"


def write_carried(store: BackupStore, name: str, carried: Carried, *, incident: str, server: str,
                  database: str) -> BackupInfo:
    """Store a kept comparison (a zip: comparison.json and the binary COPY parts)."""
    from dr.tables.pack import _Sink

    started = datetime.now(timezone.utc)
    with store.writer(name) as writer:
        with zipfile.ZipFile(_Sink(writer), "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            zf.writestr("comparison.json", json.dumps(carried.meta))
            for part in carried.parts:
                with zf.open(part, "w", force_zip64=True) as out, carried.reading(part) as src:
                    while data := src.read(1 << 20):
                        out.write(data)
        return writer.commit(BackupInfo(
            name=name, size=0, complete=True, created_at=started, finished_at=datetime.now(timezone.utc), kind=KIND,
            format="zip", source_server=server, database=database,
            manifest={"digests": carried.digests, "snapshot_xmin": carried.meta["snapshot_xmin"]},
            extra={"label": incident}))


def find_carried_all(store: BackupStore, incident: str) -> list[BackupInfo]:
    """The incident's kept comparisons (complete or not)."""
    return [b for b in store.list_backups() if b.kind == KIND and b.extra.get("label") == incident]


def find_carried(store: BackupStore, incident: str, digests: dict[str, str]) -> BackupInfo | None:
    """The newest kept comparison of the incident with exactly these digests."""
    found = [b for b in find_carried_all(store, incident) if b.complete and (b.manifest or {}).get("digests") == digests]
    return max(found, key=lambda b: b.created_at) if found else None


def read_carried(store: BackupStore, name: str) -> Carried:
    """Read a kept comparison (checksum verified) into a temporary file."""
    from dr.tables.pack import read_zip

    _info, zf, f, meta = read_zip(store, name, "kept comparison", "comparison.json")
    return Carried(meta, {}, zf, f)


__all__ = ["KIND", "Carried", "carried_name", "carry_out", "find_carried", "find_carried_all", "load_carried", "prove_unchanged",
           "read_carried", "write_carried"]
