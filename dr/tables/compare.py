"""What the recovery would change, by primary key, worked out on the live server.

The PTR server streams, for each replaced table, its rows at T (the key columns and a hash
of each whole row, see `row_hash`) into a temporary table of the live server's session (`COPY ... TO STDOUT` on one server into `COPY ... FROM STDIN` on
the other, binary, no file in between). The live server then joins them with its own rows by
primary key: a key only at T is a row that **comes back** (deleted after T), a key on both
sides with different row hashes is a row **reverted** (updated after T), a key only in the
live database is a row **removed** (inserted after T). Every column takes part: a table whose
column types all have hash functions is hashed from the values (`hash_record_extended`), any
other (json, xml, point...) by the md5 of its text under fixed session settings (time zone,
date and float formats).

Why not reladiff (the maintained fork of data-diff): it finds differing rows by checksumming
key ranges on both servers and bisecting, which saves transfer when few rows differ between
two far-apart servers. Here the two servers sit side by side, the live one must receive the
rows anyway, and every key that differs is wanted (the report's counts, the reconciliation
pack, the apply): one streamed pass of (key, md5) per table and one hash join does it, inside
the same transaction that applies the result. reladiff would add a second driver (psycopg2),
its own connection strings (with the password in them), and a second pass to fetch the rows.

Everything here runs inside a transaction that is rolled back (the report) or that the
caller commits after applying (`dr.tables.apply`); temporary tables vanish with it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

import psycopg
from psycopg import sql

from dr.commands import ConnInfo
from dr.database import connect
from dr.errors import InvalidInput, RestoreError
from dr.tables.bulk import BULK, BULK_MIN_ROWS, BULK_SHARE, ROWS, plan_bulk
from dr.tables.catalog import Catalog, ForeignKey, TableInfo, read_catalog
from dr.tables.closure import CHOSEN, DEPENDENT, NEEDED, Closure, missing_privileges, work_out_closure

log = logging.getLogger("dr.tables")

#: row text must not depend on a session's settings: both servers hash rows under these
SESSION_SETTINGS = ("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; "
                    "SET extra_float_digits = 3; SET bytea_output = 'hex'; SET lc_monetary = 'C'")
#: keys shown per kind of change
SAMPLES = 5
#: the hash column added to every staged table
H = "_dr_row_md5"
BACK, REVERTED, REMOVED = "back", "reverted", "removed"


class TableRecoveryRefused(InvalidInput):
    """Table-level recovery cannot be done as asked (a broken key, a changed schema, a missing privilege)."""


def rel(info: TableInfo) -> sql.Composable:
    """The table for reading, updating and deleting: `ONLY` an ordinary table (not inheritance
    children), the whole of a partitioned one (its partitions are its rows)."""
    return info.ident if info.kind == "p" else sql.SQL("ONLY {}").format(info.ident)


def idents(cols: tuple[str, ...] | list[str], prefix: str | None = None) -> sql.Composable:
    if prefix:
        return sql.SQL(", ").join(sql.Identifier(prefix, c) for c in cols)
    return sql.SQL(", ").join(sql.Identifier(c) for c in cols)


def row_of(cols: tuple[str, ...], prefix: str) -> sql.Composable:
    """`(p.a, p.b)`: a row value to compare keys of several columns at once."""
    return sql.SQL("({})").format(idents(cols, prefix)) if len(cols) > 1 else sql.Identifier(prefix, cols[0])


def copy_between(src: psycopg.Connection, query: sql.Composable, dst: psycopg.Connection,
                 target: sql.Composable, columns: tuple[str, ...], *, freeze: bool = False) -> int:
    """Stream the rows of `query` on one server into `target(columns)` on the other; returns the rows copied.

    `freeze`: write them frozen (`COPY ... WITH (FREEZE)`: the target was emptied or created in this
    transaction)."""
    with src.cursor() as sc, dst.cursor() as dc:
        with sc.copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(query)) as out:
            with dc.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary{})").format(
                    target, idents(columns), sql.SQL(", FREEZE") if freeze else sql.SQL(""))) as inp:
                for data in batched(out):
                    inp.write(data)
        return max(dc.rowcount, 0)


#: COPY's output arrives one row per message; what is passed on is gathered into pieces of this size
#: (one write per piece instead of per row: measured 3.9 s → 0.6 s for a pack of 964,500 keys)
BATCH_BYTES = 1 << 20


def batched(rows: Any) -> Any:
    """The data of a COPY ... TO STDOUT, in pieces of about BATCH_BYTES (COPY FROM accepts any split)."""
    buf = bytearray()
    for data in rows:
        buf += data
        if len(buf) >= BATCH_BYTES:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


#: how a whole row is hashed: `hash_record_extended` (PostgreSQL 14+, 64 bits, from the values' binary
#: form: no text conversion, ~3x faster) where every column type has a hash function; otherwise the md5
#: of the row's text (json, xml, point... have no hash function), cut to 64 bits
FAST, TEXT = "hash_record_extended", "md5"


def row_hash(kind: str, alias: str = "x") -> sql.Composable:
    if kind == FAST:
        return sql.SQL("hash_record_extended({}, 0)").format(sql.Identifier(alias))
    return sql.SQL("('x' || left(md5({}::text), 16))::bit(64)::bigint").format(sql.Identifier(alias))


def hash_kind(c: psycopg.Connection, info: TableInfo) -> str:
    """FAST when the server has it and every column type of the table has an extended hash function."""
    try:
        with c.transaction():
            c.execute(sql.SQL("SELECT hash_record_extended(ROW({}), 0) FROM (SELECT (NULL::{}).*) x").format(
                sql.SQL(", ").join(sql.Identifier("x", col.name) for col in info.columns), info.ident))
        return FAST
    except psycopg.Error:
        return TEXT


def key_text(values: tuple) -> str:
    return str(values[0]) if len(values) == 1 else "(" + ", ".join(str(v) for v in values) + ")"


@dataclass
class TableChanges:
    """What the recovery does to one table of the closure."""

    table: str
    role: str
    key: tuple[str, ...]
    live_rows: int = 0
    t_rows: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {BACK: 0, REVERTED: 0, REMOVED: 0})
    samples: dict[str, list[str]] = field(default_factory=dict)
    digest: str = ""
    note: str = ""
    method: str = ROWS  # ROWS: row by row; BULK: TRUNCATE + COPY from the PTR server (dr.tables.bulk)
    method_note: str = ""  # why bulk, or why not although most rows change

    @property
    def whole_table(self) -> bool:
        """Replaced without a primary key: every row out, every row at T in."""
        return self.role != NEEDED and not self.key

    @property
    def changed(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        if self.whole_table:
            return f"{self.table}: {self.note}" + (f"; {self.method_note}" if self.method_note else "")
        parts = [f"{self.counts[BACK]} come back", f"{self.counts[REVERTED]} reverted", f"{self.counts[REMOVED]} removed"]
        if self.role == NEEDED:
            parts = [f"{self.counts[BACK]} row(s) that the restored rows need come back; nothing else changes"]
        text = f"{self.table} ({self.role}; {self.live_rows} rows now, {self.t_rows} at T): " + ", ".join(parts)
        for kind in (BACK, REVERTED, REMOVED):
            if self.samples.get(kind):
                more = self.counts[kind] - len(self.samples[kind])
                text += (f"; {kind} {'/'.join(self.key)} = {', '.join(self.samples[kind])}"
                         + (f" (+{more} more)" if more > 0 else ""))
        return text + (f"; {self.method_note}" if self.method_note else "")


@dataclass
class KeptTable:
    """A table the recovery does not replace, so its writes after T stay: outside the closure, excluded by
    the operator, or needed (only rows the restored ones reference and the live database lost come back)."""

    table: str
    live_rows: int
    t_rows: int | None
    ids_after_t: dict[str, int] = field(default_factory=dict)  # sequence -> values handed out after T
    how: str = "outside the closure"

    def line(self) -> str:
        net = "" if self.t_rows is None else f" ({self.live_rows - self.t_rows:+d} since T)"
        ids = "; ".join(f"{n} ids handed out after T by {s}" for s, n in self.ids_after_t.items() if n > 0)
        return (f"{self.table} ({self.how}): {self.live_rows} rows now, {self.t_rows if self.t_rows is not None else '?'} "
                f"at T{net}" + (f"; {ids}" if ids else "") + ": every write after T kept")


@dataclass
class SequenceMove:
    sequence: str
    live_next: int
    ptr_next: int
    moves: bool  # the PTR server's sequence is ahead: set the live one forward to it
    ptr_last: int = 0
    ptr_called: bool = True


@dataclass
class ChangeReport:
    """The "what this changes" report, shown at the approval gate and kept in the incident report."""

    closure: list[str]
    closure_markdown: str
    tables: list[TableChanges]
    kept: list[KeptTable]
    sequences: list[SequenceMove]
    triggers: list[str]
    blockers: list[str]
    restore_time: str = ""
    seconds: float = 0.0

    def digests(self) -> dict[str, str]:
        return {t.table: t.digest for t in self.tables}

    def rows_kept(self) -> int:
        """Net rows written after T in the tables not replaced: at least what whole-database recovery would lose."""
        return sum(abs(k.live_rows - k.t_rows) for k in self.kept if k.t_rows is not None)

    def markdown(self) -> str:
        lines = ["## What this changes", ""]
        if self.restore_time:
            lines += [f"Tables replaced with their rows as at {self.restore_time}; keys by primary key.", ""]
        lines += ["| table | in as | rows now | rows at T | come back | reverted | removed | sample keys |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in self.tables:
            if t.whole_table:
                lines.append(f"| {t.table} | {t.role} | {t.live_rows} | {t.t_rows} | whole table | | | {t.note} |")
                continue
            sample = "; ".join(f"{k}: {', '.join(t.samples[k])}" for k in (BACK, REVERTED, REMOVED) if t.samples.get(k))
            lines.append(f"| {t.table} | {t.role} | {t.live_rows} | {t.t_rows} | {t.counts[BACK]} | "
                         f"{t.counts[REVERTED]} | {t.counts[REMOVED]} | {sample} |")
        lines += ["", "Come back: deleted after T. Reverted: updated after T (the update is undone). Removed: inserted "
                  "after T. Reverted and removed rows are in the reconciliation pack.", ""]
        notes = [f"- {t.table}: {t.method_note}" for t in self.tables if t.method_note]
        if notes:
            lines += ["How the rows are replaced:", ""] + notes + [""]
        lines += ["### Why each table is in", "", self.closure_markdown, ""]
        lines += ["### Kept: the RPO gained", ""]
        if self.kept:
            lines += ["These tables are not replaced: the recovery writes nothing to them (checked in its transaction "
                      "before commit) except, in a needed table, the rows the restored rows reference and the live "
                      "database lost. Every write made to them after T is kept: their data loss is zero, where "
                      "whole-database recovery would take them back to T too.", ""]
            lines += [f"- {k.line()}" for k in self.kept]
        else:
            lines.append("- every table is replaced: nothing is kept beyond what whole-database recovery keeps")
        moving = [s for s in self.sequences if s.moves]
        lines += ["", "### Sequences and triggers", ""]
        lines.append(f"- sequences: {len(self.sequences)} of these tables; ids never go back"
                     + (f"; moved forward to the PTR server's value: {', '.join(s.sequence for s in moving)}"
                        if moving else " (none is behind the PTR server, so none moves)"))
        lines.append("- triggers disabled for the transaction (re-enabled before commit): "
                     + (", ".join(self.triggers) if self.triggers else "none (no user triggers on these tables)"))
        if self.blockers:
            lines += ["", "### Refused", ""] + [f"- {b}" for b in self.blockers]
        return "\n".join(lines)

    def gate_text(self) -> str:
        """The plain text shown at the approval gate."""
        out = ["what this changes (keys by primary key):"] + [f"- {t.line()}" for t in self.tables]
        out += ["kept (writes after T stay; whole-database recovery would lose them):"] + [f"- {k.line()}" for k in self.kept]
        moving = [s.sequence for s in self.sequences if s.moves]
        if moving:
            out.append(f"sequences moved forward to the PTR value: {', '.join(moving)}")
        if self.triggers:
            out.append(f"triggers disabled for the transaction: {', '.join(self.triggers)}")
        return "\n".join(out)


# --- the working session ------------------------------------------------------------------


@dataclass
class Stage:
    """Rows of one table at T, staged in a temporary table of the live session."""

    name: sql.Identifier
    columns: tuple[str, ...]
    rows: int


@dataclass
class Work:
    """Both servers' sessions with what has been staged so far."""

    live: psycopg.Connection
    ptr: psycopg.Connection
    cat: Catalog
    ptr_cat: Catalog
    closure: Closure
    full_rows: bool
    stages: dict[str, Stage] = field(default_factory=dict)
    diffs: dict[str, sql.Identifier] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)  # table -> FAST or TEXT
    needed: dict[str, Stage] = field(default_factory=dict)
    changes: dict[str, TableChanges] = field(default_factory=dict)
    blockers: list[str] = field(default_factory=list)
    snapshot_xmin: int = 0  # the live session's snapshot: every transaction below it had ended
    t_sums: dict[str, tuple[int, str]] = field(default_factory=dict)  # bulk tables: rows at T and sum of hashes
    partial: set[str] = field(default_factory=set)  # tables staged only for the keys that change
    _n: int = 0

    def temp(self, kind: str) -> sql.Identifier:
        self._n += 1
        return sql.Identifier(f"dr_{kind}_{self._n}")

    def info(self, table: str) -> TableInfo:
        return self.cat.tables[table]

    def hash(self, table: str, alias: str = "x") -> sql.Composable:
        if table not in self.hashes:
            self.hashes[table] = hash_kind(self.live, self.info(table))
        return row_hash(self.hashes[table], alias)


def _key_columns(w: Work, table: str) -> tuple[str, ...]:
    """The columns staged for a table when only keys are compared: its primary key, the columns of its
    foreign keys, and the columns other tables' keys reference; in the table's column order."""
    info = w.info(table)
    want = set(info.primary_key)
    for fk in w.cat.foreign_keys:
        if fk.child == table:
            want.update(fk.columns)
        if fk.parent == table:
            want.update(fk.parent_columns)
    return tuple(c.name for c in info.columns if c.name in want)


def _stage_table(w: Work, table: str, columns: tuple[str, ...], where: sql.Composable | None = None,
                 into: Stage | None = None) -> Stage:
    """Copy `columns` of the table's rows at T (and each whole row's md5) from the PTR server into
    a temporary table of the live session."""
    info = w.info(table)
    if into is None:
        name = w.temp("s")
        w.live.execute(sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
            name, idents(columns) if columns else sql.SQL(""), info.ident))
        w.live.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint").format(name, sql.Identifier(H)))
        into = Stage(name, columns, 0)
    query = sql.SQL("SELECT {}{}{} FROM {} x{}").format(
        idents(columns, "x"), sql.SQL(", ") if columns else sql.SQL(""), w.hash(table), rel(info),
        sql.SQL(" WHERE ") + where if where is not None else sql.SQL(""))
    copy_between(w.ptr, query, w.live, into.name, (*columns, H))
    into.rows = w.live.execute(sql.SQL("SELECT count(*) FROM {}").format(into.name)).fetchone()[0]
    w.live.execute(sql.SQL("ANALYZE {}").format(into.name))
    return into


def _diff(w: Work, table: str) -> None:
    """Join the staged rows at T with the live rows by primary key: what comes back, is reverted, is removed."""
    info, stage = w.info(table), w.stages[table]
    ch = w.changes[table]
    ch.t_rows = stage.rows
    if not info.primary_key:
        ch.live_rows = w.live.execute(sql.SQL("SELECT count(*) FROM {}").format(rel(info))).fetchone()[0]
        ch.note = (f"no primary key, so rows cannot be matched one by one: the whole table is replaced "
                   f"({ch.live_rows} rows now → {ch.t_rows} at T); no per-row counts, samples or re-apply script")
        ch.digest = f"whole:{ch.live_rows}:{ch.t_rows}"
        return
    pk = info.primary_key
    d = w.temp("d")
    w.diffs[table] = d
    w.live.execute(sql.SQL("""
        CREATE TEMP TABLE {d} ON COMMIT DROP AS
        SELECT {pk}, CASE WHEN l.{h} IS NULL THEN 'back' WHEN s.{h} IS NULL THEN 'removed' ELSE 'reverted' END
                     AS _dr_kind, l.{h} AS _dr_live_h, s.{h} AS _dr_t_h
        FROM (SELECT {xpk}, {hash} AS {h} FROM {t} x) l
        FULL JOIN (SELECT {pk}, {h} FROM {s}) s USING ({pk})
        WHERE l.{h} IS DISTINCT FROM s.{h}""").format(
        d=d, pk=idents(pk), xpk=idents(pk, "x"), h=sql.Identifier(H), t=rel(info), s=stage.name, hash=w.hash(table)))
    w.live.execute(sql.SQL("ANALYZE {}").format(d))
    # what the approval pins: per kind, the number of keys and the sum of a 64-bit hash of each (key, kind,
    # live row hash, row hash at T); order-free, so no sort of the keys
    for kind, n, digest in w.live.execute(sql.SQL(
            "SELECT _dr_kind, count(*), sum({hash}::numeric)::text FROM {d} d GROUP BY 1").format(
            hash=row_hash(w.hashes[table], "d"), d=d)).fetchall():
        ch.counts[kind] = n
        ch.digest += f"{kind}:{n}:{digest};"
        ch.samples[kind] = [key_text(r) for r in w.live.execute(sql.SQL(
            "SELECT {pk} FROM {d} d WHERE _dr_kind = %s ORDER BY {opk} LIMIT %s").format(
            pk=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("d", c)) for c in pk), d=d,
            opk=idents(pk, "d")), (kind, SAMPLES)).fetchall()]
    ch.digest = ch.digest or "none"
    # every key is unique: the live table holds the keys at T, less those that come back, plus those removed
    ch.live_rows = ch.t_rows - ch.counts[BACK] + ch.counts[REMOVED]


def _choose_methods(w: Work) -> None:
    """Row by row, or in bulk (dr.tables.bulk) where most rows change and the role may rebuild the table.

    The choice is part of each table's digest, so the approval covers it and the apply makes the same.
    """
    big = []
    for t in w.closure.replaced:
        ch = w.changes[t]
        size = max(ch.t_rows, ch.live_rows)
        changed = size if ch.whole_table else ch.changed
        if size >= BULK_MIN_ROWS and changed >= BULK_SHARE * size:
            big.append(t)
    if not big:
        return
    plan = plan_bulk(w.live, w.cat, big)
    for t in big:
        ch = w.changes[t]
        why = plan.blockers.get(t, [])
        if why:
            ch.method_note = ("replaced row by row although most of its rows change; in bulk it would be much faster, "
                              "but " + "; ".join(why))
            continue
        ch.method = BULK
        ch.digest = f"{BULK}|{ch.digest}"
        n, total = w.live.execute(sql.SQL("SELECT count(*), coalesce(sum({h}::numeric), 0)::text FROM {s}").format(
            h=sql.Identifier(H), s=w.stages[t].name)).fetchone()
        w.t_sums[t] = (int(n), total)
        ch.method_note = (f"replaced in bulk: emptied and reloaded with its {ch.t_rows} rows at T straight from the PTR "
                          "server (TRUNCATE + COPY FREEZE), indexes rebuilt, foreign keys re-added and validated; the "
                          "table (and the tables its keys link it to) cannot be read by other sessions until COMMIT")


def _collect_needed(w: Work) -> None:
    """Bring the rows the restored rows reference, and that the live database lost, into temporary
    tables (recursively: those rows may need others). A narrowing that leaves such rows out is a blocker."""
    cl = w.closure
    parents_of_interest = set(cl.needed) | {t for t, m in cl.excluded.items() if m.role == NEEDED}
    progress = True
    while progress:
        progress = False
        for fk in w.cat.foreign_keys:
            child, parent = fk.child, fk.parent
            if child == parent or parent not in parents_of_interest:
                continue
            src = w.stages.get(child) if child in cl.replaced else w.needed.get(child)
            if src is None:
                continue
            pinfo = w.info(parent)
            # rows unchanged since T already have what they reference in the live database (its keys held)
            changed_only = (sql.SQL(" AND EXISTS (SELECT 1 FROM {d} d WHERE {dk} = {sk} AND d._dr_kind <> 'removed')").format(
                d=w.diffs[child], dk=row_of(w.info(child).primary_key, "d"), sk=row_of(w.info(child).primary_key, "s"))
                if child in w.diffs else sql.SQL(""))
            not_null = sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(sql.Identifier("s", c)) for c in fk.columns)
            also_staged = (sql.SQL(" AND NOT EXISTS (SELECT 1 FROM {} n WHERE {} = {})").format(
                w.needed[parent].name, row_of(fk.parent_columns, "n"), row_of(fk.columns, "s"))
                if parent in w.needed else sql.SQL(""))
            missing = w.live.execute(sql.SQL(
                "SELECT DISTINCT {cols} FROM {src} s WHERE {nn}{changed} AND NOT EXISTS "
                "(SELECT 1 FROM {p} p WHERE {pk} = {ck}){also}").format(
                cols=idents(fk.columns, "s"), src=src.name, nn=not_null, p=rel(pinfo), changed=changed_only,
                pk=row_of(fk.parent_columns, "p"), ck=row_of(fk.columns, "s"), also=also_staged)).fetchall()
            if not missing:
                continue
            if parent in cl.excluded:
                w.blockers.append(
                    f"narrowing refused: excluding {parent} breaks {fk.name} ({fk.child}({', '.join(fk.columns)}) → "
                    f"{parent}): the rows of {child} as at T reference {len(missing)} {parent} row(s) that the live "
                    f"database no longer has: {parent}({', '.join(fk.parent_columns)}) = "
                    + ", ".join(key_text(r) for r in missing[:SAMPLES]) + (" …" if len(missing) > SAMPLES else ""))
                continue
            # ship the missing keys to the PTR session, fetch those rows
            q = w.temp("q")
            w.ptr.execute(sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
                q, idents(fk.parent_columns), pinfo.ident))
            with w.ptr.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(q)) as cp:
                for r in missing:
                    cp.write_row(r)
            where = sql.SQL("{} IN (SELECT {} FROM {})").format(row_of(fk.parent_columns, "x"),
                                                                 idents(fk.parent_columns), q)
            cols = tuple(c.name for c in pinfo.columns)
            before = w.needed[parent].rows if parent in w.needed else 0
            w.needed[parent] = _stage_table(w, parent, cols, where, into=w.needed.get(parent))
            progress = progress or w.needed[parent].rows > before
    for parent in cl.needed:
        ch = w.changes[parent]
        stage = w.needed.get(parent)
        ch.counts[BACK] = stage.rows if stage else 0
        ch.live_rows = -1  # filled by the counts
        if stage and stage.rows:
            key = w.info(parent).primary_key or stage.columns[:1]
            ch.samples[BACK] = [key_text(r) for r in w.live.execute(sql.SQL(
                "SELECT {k} FROM {s} s ORDER BY {o} LIMIT %s").format(
                k=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("s", c)) for c in key), s=stage.name,
                o=idents(key, "s")), (SAMPLES,)).fetchall()]
            digest = w.live.execute(sql.SQL("SELECT md5(string_agg({h}::text, ',' ORDER BY {h})) FROM {s}").format(
                h=sql.Identifier(H), s=stage.name)).fetchone()[0]
            ch.digest = f"needed:{stage.rows}:{digest}"
        else:
            ch.digest = "needed:0"


def _check_exclusions(w: Work) -> None:
    """An excluded table that references a replaced one must not hold rows whose reference the recovery breaks."""
    for excluded, member in w.closure.excluded.items():
        if member.role != DEPENDENT:
            continue
        einfo = w.info(excluded)
        for fk in w.cat.references_from(excluded):
            if fk.parent not in w.closure.replaced:
                continue
            stage = w.stages[fk.parent]
            not_null = sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(sql.Identifier("e", c)) for c in fk.columns)
            key = einfo.primary_key or fk.columns
            rows = w.live.execute(sql.SQL(
                "SELECT {k} FROM {e} e WHERE {nn} AND NOT EXISTS (SELECT 1 FROM {s} s WHERE {sk} = {ek}) "
                "ORDER BY {ok}").format(
                k=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("e", c)) for c in key), e=rel(einfo),
                nn=not_null, s=stage.name, sk=row_of(fk.parent_columns, "s"), ek=row_of(fk.columns, "e"),
                ok=idents(key, "e"))).fetchall()
            if rows:
                effect = {"CASCADE": "would be deleted", "SET NULL": "would be set to NULL",
                          "SET DEFAULT": "would be set to their default"}.get(fk.action, "would break the key")
                w.blockers.append(
                    f"narrowing refused: excluding {excluded} breaks {fk.name} ({excluded}({', '.join(fk.columns)}) → "
                    f"{fk.parent}({', '.join(fk.parent_columns)}), ON DELETE {fk.action}): {len(rows)} row(s) of "
                    f"{excluded} reference {fk.parent} rows the recovery removes or changes, and {effect}: "
                    f"{excluded}({', '.join(key)}) = " + ", ".join(key_text(r) for r in rows[:SAMPLES])
                    + (f" (+{len(rows) - SAMPLES} more)" if len(rows) > SAMPLES else ""))


def _sequence_value(c: psycopg.Connection, seq_ident: sql.Identifier, schema: str, name: str) -> tuple[int, bool, int]:
    last, called = c.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(seq_ident)).fetchone()
    inc = c.execute("SELECT increment_by FROM pg_sequences WHERE schemaname = %s AND sequencename = %s",
                    (schema, name)).fetchone()
    return int(last), bool(called), int(inc[0]) if inc else 1


def _next(last: int, called: bool, inc: int) -> int:
    return last + inc if called else last


def _sequences(w: Work, tables: list[str]) -> list[SequenceMove]:
    out, seen = [], set()
    for t in tables:
        for s in w.info(t).sequences:
            if s.display in seen:
                continue
            seen.add(s.display)
            ll, lc, inc = _sequence_value(w.live, s.ident, s.schema, s.name)
            pl, pc, _ = _sequence_value(w.ptr, s.ident, s.schema, s.name)
            ln, pn = _next(ll, lc, inc), _next(pl, pc, inc)
            moves = (pn - ln) * (1 if inc > 0 else -1) > 0
            if moves and not s.can_update:
                w.blockers.append(f"UPDATE on sequence {s.display} is needed: it is behind the PTR server's "
                                  f"({ln} < {pn}) and must move forward so that ids never go back")
            out.append(SequenceMove(s.display, ln, pn, moves, pl, pc))
    return out


def _count_all(conn: ConnInfo, tables: list[TableInfo]) -> dict[str, int]:
    """Exact row counts of some tables, in one snapshot (run on its own connection, beside the comparison)."""
    with connect(conn, autocommit=False) as c:
        c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        out = {t.name: c.execute(sql.SQL("SELECT count(*) FROM {}").format(rel(t))).fetchone()[0] for t in tables}
        c.rollback()
    return out


def _sequence_values(conn: ConnInfo, tables: list[TableInfo]) -> dict[str, int]:
    out: dict[str, int] = {}
    with connect(conn) as c:
        for t in tables:
            for s in t.sequences:
                if s.can_read and s.display not in out:
                    try:
                        last, called, inc = _sequence_value(c, s.ident, s.schema, s.name)
                        out[s.display] = _next(last, called, inc)
                    except psycopg.Error:
                        pass
    return out


def _shape_blockers(cat: Catalog, ptr_cat: Catalog, tables: list[str]) -> list[str]:
    out = []
    for t in tables:
        if t not in ptr_cat.tables:
            out.append(f"{t} did not exist at T (it is not on the PTR server): there are no rows to bring back")
            continue
        live, then = cat.tables[t].shape(), ptr_cat.tables[t].shape()
        if live != then:
            gone = [c[0] for c in then if c[0] not in {x[0] for x in live}]
            new = [c[0] for c in live if c[0] not in {x[0] for x in then}]
            changed = [c[0] for c in live if c in live and c[0] in {x[0] for x in then} and c not in then]
            detail = "; ".join(p for p in (f"columns dropped since T: {', '.join(gone)}" if gone else "",
                                           f"columns added since T: {', '.join(new)}" if new else "",
                                           f"columns changed since T: {', '.join(changed)}" if changed else "",
                                           "column order differs" if not (gone or new or changed) else "") if p)
            out.append(f"{t}: its columns differ between the live database and T ({detail}); table-level recovery "
                       "moves rows, not schema: use whole-database recovery, or restore the schema first")
    return out


def open_sessions(stack: ExitStack, live: ConnInfo, ptr: ConnInfo, *,
                  application_name: str) -> tuple[psycopg.Connection, psycopg.Connection]:
    """Both sessions (live read-write, PTR for reading), with the settings row hashes depend on; no transaction yet."""
    sessions = []
    for conn in (live, ptr):
        c = stack.enter_context(connect(conn, autocommit=True))
        c.execute(SESSION_SETTINGS)
        c.execute(sql.SQL("SET application_name = {}").format(sql.Literal(application_name[:63])))
        c.autocommit = False
        c.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        sessions.append(c)
    return sessions[0], sessions[1]


def start_work(lc: psycopg.Connection, pc: psycopg.Connection, tables: list[str] | str, *, full_rows: bool) -> Work:
    """Read both catalogs in the sessions' transactions (their snapshots start here) and work out the closure."""
    from dr.tables.closure import parse_choice

    chosen, excluded = parse_choice(tables)
    # the snapshot's xmin: a row whose xmin is at or above it was written by a transaction this snapshot
    # does not see as ended (dr.tables.carry proves with it that a table did not change since)
    snapshot_xmin = int(lc.execute("SELECT txid_snapshot_xmin(txid_current_snapshot())").fetchone()[0])
    cat, ptr_cat = read_catalog(lc), read_catalog(pc)
    closure = work_out_closure(cat, chosen, excluded)
    w = Work(lc, pc, cat, ptr_cat, closure, full_rows, snapshot_xmin=snapshot_xmin)
    lacking = missing_privileges(cat, closure)
    if lacking:
        w.blockers.append(f"{cat.user} lacks privileges table-level recovery needs on {cat.database}: "
                          + "; ".join(lacking))
    w.blockers += _shape_blockers(cat, ptr_cat, closure.order)
    return w


def open_work(stack: ExitStack, live: ConnInfo, ptr: ConnInfo, tables: list[str] | str, *, full_rows: bool,
              application_name: str) -> Work:
    """Open both sessions in REPEATABLE READ transactions, read the catalogs and work out the closure."""
    lc, pc = open_sessions(stack, live, ptr, application_name=application_name)
    return start_work(lc, pc, tables, full_rows=full_rows)


def stage_and_compare(w: Work, lap: Callable[[str], None] = lambda name: None) -> None:
    """Stage every replaced table's rows at T, diff them, collect the needed rows and check narrowings."""
    if w.blockers:
        return
    for t in w.closure.order:
        m = w.closure.members[t]
        w.changes[t] = TableChanges(t, m.role, w.info(t).primary_key)
    for t in w.closure.replaced:
        info = w.info(t)
        # rows are matched by key and hash; a table without a key is replaced whole, so its rows travel whole
        cols = tuple(c.name for c in info.columns) if (w.full_rows or not info.primary_key) else _key_columns(w, t)
        w.stages[t] = _stage_table(w, t, cols)
        lap(f"stage {t}")
        _diff(w, t)
        lap(f"diff {t}")
    _choose_methods(w)
    _collect_needed(w)
    lap("needed rows")
    _check_exclusions(w)
    lap("narrowing checks")


def compare(live: ConnInfo, ptr: ConnInfo, tables: list[str] | str, *, restore_time: str = "",
            application_name: str = "dr-orchestrator table compare",
            on_compared: Callable[[Work, ChangeReport], Any] | None = None) -> ChangeReport:
    """The "what this changes" report of recovering `tables` from the PTR server; changes nothing.

    Args:
        live: the live database.
        ptr: the same database on the PTR server (as at T).
        tables: the chosen tables (`-name` narrows the closure).
        restore_time: T, as the report should say it.
        application_name: how the sessions show in pg_stat_activity.
        on_compared: called with the open sessions once the comparison is done (the reconciliation
            pack is written from them, in the same snapshot).

    Returns:
        The report; `blockers` says why the recovery would be refused (nothing is raised for them).
    """
    started = time.monotonic()
    with ExitStack() as stack:
        w = open_work(stack, live, ptr, tables, full_rows=False, application_name=application_name)
        outside = [i for n, i in w.cat.tables.items()
                   if n not in w.closure.replaced and not i.partition_of and n in w.ptr_cat.tables]
        with concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="dr-count") as pool:
            # the replaced tables are counted by the comparison itself, in its snapshot
            counts = {side: pool.submit(_count_all, conn, outside) for side, conn in
                      (("live", live), ("ptr", ptr))}
            seqs = {side: pool.submit(_sequence_values, conn, outside) for side, conn in (("live", live), ("ptr", ptr))}
            stage_and_compare(w)
            sequences = _sequences(w, w.closure.order) if w.changes else []
            live_counts, ptr_counts = counts["live"].result(), counts["ptr"].result()
            live_seq, ptr_seq = seqs["live"].result(), seqs["ptr"].result()
        for t, ch in w.changes.items():
            ch.live_rows, ch.t_rows = live_counts.get(t, ch.live_rows), ptr_counts.get(t, ch.t_rows)
        kept = [KeptTable(i.name, live_counts.get(i.name, 0), ptr_counts.get(i.name),
                          {s.display: live_seq[s.display] - ptr_seq[s.display] for s in i.sequences
                           if s.display in live_seq and s.display in ptr_seq},
                          how=("excluded by the operator" if i.name in w.closure.excluded else
                               "needed: only the rows the restored rows reference and the live database lost come "
                               "back" if i.name in w.closure.members else "outside the closure"))
                for i in outside]
        triggers = [f"{tr.relation}.{tr.name}" for t in w.closure.order for tr in w.info(t).firing_triggers]
        report = ChangeReport(w.closure.lines(), w.closure.markdown(), [w.changes[t] for t in w.closure.order if t in w.changes],
                              kept, sequences, triggers, list(w.blockers), restore_time)
        if on_compared is not None and not report.blockers:
            on_compared(w, report)
        w.live.rollback()
        w.ptr.rollback()
    report.seconds = time.monotonic() - started
    return report


def raise_blockers(report_or_blockers: ChangeReport | list[str], *, world_state: str) -> None:
    blockers = report_or_blockers.blockers if isinstance(report_or_blockers, ChangeReport) else report_or_blockers
    if blockers:
        raise TableRecoveryRefused("table-level recovery refused: " + " | ".join(blockers), world_state=world_state)


__all__ = ["FAST", "TEXT", "row_hash", "hash_kind", "ChangeReport", "KeptTable", "SequenceMove", "TableChanges", "TableRecoveryRefused", "Work", "compare",
           "open_work", "open_sessions", "start_work", "batched", "raise_blockers", "stage_and_compare", "rel", "idents", "row_of", "copy_between", "H",
           "BACK", "REVERTED", "REMOVED", "CHOSEN", "DEPENDENT", "NEEDED", "ForeignKey", "RestoreError"]
