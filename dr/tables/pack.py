"""The reconciliation pack: the writes made after T that table-level recovery discards.

For each replaced table with a primary key, the live database's rows that the recovery
removes (inserted after T) and reverts (updated after T, in their post-T version) are exported
as CSV, with the md5 of each reverted row as it was at T and the keys of the rows deleted after
T (which come back). A table without a primary key cannot be matched row by row: its whole
content before the recovery is exported instead. `apply.sql` re-applies, in one transaction, the
rows that do not conflict (see `statements`); `dr reconcile` runs the same statements after
showing what each would do.

The pack is one zip file, streamed into the backup store beside the incident's safety backup
(kind `reconcile-pack`, labelled with the incident) from the same snapshot the "what this
changes" report was computed in: it holds exactly what the approved recovery discards.

The store also keeps one small record per attempt to apply the recovery (kind
`table-recovery`): the live server's transaction id, so that a re-run asks the server whether
that transaction committed and never applies twice.
"""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any

from psycopg import sql

from dr.errors import BackupError, BackupNotFound
from dr.platforms.base import BackupInfo, BackupStore
from dr.tables.compare import (BACK, REMOVED, REVERTED, SESSION_SETTINGS, TEXT, ChangeReport, Work, batched, idents,
                               rel, row_hash)

PACK_KIND = "reconcile-pack"
RECORD_KIND = "table-recovery"
FORMAT_VERSION = 1
INSERTED, UPDATED = "inserted", "updated"
#: the md5 column of `updated_at_t_hash.csv`
T_MD5 = "_dr_row_hash_at_t"

README = """Reconciliation pack of incident {incident} ({service} {environment}, database {database})

Table-level recovery replaced the rows of {tables} with their rows as at {restore_time}.
The writes made after that time which it discarded are here, per table:

  tables/<schema>.<table>/inserted_after_t.csv   rows inserted after T (the recovery removed them)
  tables/<schema>.<table>/updated_after_t.csv    rows updated after T, as they were after the update
                                                 (the recovery reverted them to their value at T)
  tables/<schema>.<table>/updated_at_t_hash.csv   the key and a 64-bit hash of each of those rows as at T
  tables/<schema>.<table>/deleted_after_t_keys.csv  keys of rows deleted after T (the recovery brought
                                                 them back; listed for reference, never re-deleted)
  tables/<schema>.<table>/all_rows_before_recovery.csv  a table without a primary key: every row it
                                                 held before the recovery (rows cannot be matched)

Each CSV has a header and the table's columns in order (PostgreSQL's CSV: ISO dates, UTC times).

apply.sql re-applies, in one transaction, the rows that do not conflict:
  - an inserted row whose key is free and whose references exist (other unique conflicts are skipped);
  - an updated row whose current value is still exactly its value at T, and whose references exist.
Run it from this folder: psql "<connection>" -v ON_ERROR_STOP=1 -f apply.sql
or let the tool do it, with a plan, an approval and checks: dr reconcile --incident {incident} [--tables …] [--apply]
"""


def pack_name(service: str, env_short: str, incident: str, when: datetime) -> str:
    return f"{service}_{env_short}_{PACK_KIND}_{incident}_{when.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}.zip"


class _Sink(io.RawIOBase):
    """A write-only stream into a store upload (zipfile writes data descriptors when it cannot seek)."""

    def __init__(self, writer: Any):
        self.writer = writer

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        if data:
            self.writer.write(data)
        return len(data)


def _export(zf: zipfile.ZipFile, path: str, w: Work, query: sql.Composable) -> None:
    with zf.open(path, "w", force_zip64=True) as f, w.live.cursor() as cur:
        with cur.copy(sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true)").format(query)) as cp:
            for data in batched(cp):
                f.write(data)


def _table_entry(w: Work, table: str) -> dict[str, Any]:
    info = w.info(table)
    return {
        "table": table, "schema": info.schema, "name": info.table,
        "columns": [c.name for c in info.columns], "writable": list(info.writable),
        "identity_always": list(info.identity_always), "primary_key": list(info.primary_key),
        "foreign_keys": [{"name": fk.name, "columns": list(fk.columns), "parent": fk.parent,
                          "parent_schema": w.info(fk.parent).schema, "parent_name": w.info(fk.parent).table,
                          "parent_columns": list(fk.parent_columns)} for fk in w.cat.foreign_keys if fk.child == table],
        "triggers": [{"relation": tr.relation, "schema": w.info(tr.relation).schema,
                      "name_of_relation": w.info(tr.relation).table, "name": tr.name, "enabled": tr.enabled}
                     for tr in info.firing_triggers],
        "files": {}, "counts": {INSERTED: 0, UPDATED: 0, "deleted": 0}, "whole_table": not info.primary_key,
        "row_hash": w.hashes.get(table, "md5"),
    }


def write_pack(store: BackupStore, name: str, w: Work, report: ChangeReport, *, incident: str, service: str,
               environment: str, server: str, safety_backup: str | None) -> BackupInfo:
    """Stream the pack of what the compared recovery discards into the store (from `w`'s open snapshot)."""
    started = datetime.now(timezone.utc)
    entries = []
    with store.writer(name) as writer:
        with zipfile.ZipFile(_Sink(writer), "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            for t in w.closure.replaced:
                info, ch = w.info(t), w.changes[t]
                entry = _table_entry(w, t)
                base = f"tables/{t}/"
                if not info.primary_key:
                    entry["files"]["all_rows"] = base + "all_rows_before_recovery.csv"
                    entry["counts"]["all_rows"] = ch.live_rows
                    _export(zf, entry["files"]["all_rows"], w, sql.SQL("SELECT x.* FROM {} x").format(rel(info)))
                    entries.append(entry)
                    continue
                d, pk = w.diffs[t], info.primary_key
                xpk = sql.SQL(", ").join(sql.Identifier("x", c) for c in pk)

                def rows_of(kind: str) -> sql.Composable:
                    return sql.SQL("SELECT x.* FROM {t} x JOIN {d} d ON {dk} = {xk} WHERE d._dr_kind = {k} "
                                   "ORDER BY {xpk}").format(
                        t=rel(info), d=d, dk=_row(pk, "d"), xk=_row(pk, "x"), k=sql.Literal(kind), xpk=xpk)

                for key, kind, fname in ((INSERTED, REMOVED, "inserted_after_t.csv"),
                                         (UPDATED, REVERTED, "updated_after_t.csv")):
                    entry["counts"][key] = ch.counts[kind]
                    if ch.counts[kind]:
                        entry["files"][key] = base + fname
                        _export(zf, base + fname, w, rows_of(kind))
                if ch.counts[REVERTED]:
                    entry["files"]["updated_t_md5"] = base + "updated_at_t_hash.csv"
                    _export(zf, base + "updated_at_t_hash.csv", w, sql.SQL(
                        "SELECT {pk}, _dr_t_h AS {m} FROM {d} WHERE _dr_kind = 'reverted' ORDER BY {pk}").format(
                        pk=idents(pk), m=sql.Identifier(T_MD5), d=d))
                entry["counts"]["deleted"] = ch.counts[BACK]
                if ch.counts[BACK]:
                    entry["files"]["deleted_keys"] = base + "deleted_after_t_keys.csv"
                    _export(zf, base + "deleted_after_t_keys.csv", w, sql.SQL(
                        "SELECT {pk} FROM {d} WHERE _dr_kind = 'back' ORDER BY {pk}").format(pk=idents(pk), d=d))
                entries.append(entry)
            manifest = {
                "format": FORMAT_VERSION, "incident": incident, "service": service, "environment": environment,
                "server": server, "database": w.cat.database, "restore_time": report.restore_time,
                "created_at": started.isoformat(), "safety_backup": safety_backup,
                "closure": report.closure, "digests": report.digests(), "tables": entries,
            }
            zf.writestr("manifest.json", json.dumps(manifest, indent=2))
            zf.writestr("apply.sql", render_script(manifest))
            zf.writestr("README.txt", README.format(
                incident=incident, service=service, environment=environment, database=w.cat.database,
                tables=", ".join(w.closure.replaced), restore_time=report.restore_time or "T"))
        summary = {e["table"]: e["counts"] for e in entries}
        return writer.commit(BackupInfo(
            name=name, size=0, complete=True, created_at=started, finished_at=datetime.now(timezone.utc),
            kind=PACK_KIND, format="zip", source_server=server, database=w.cat.database,
            manifest={"tables": summary, "digests": report.digests()},
            extra={"label": incident, "service": service, "environment": environment,
                   **({"safety_backup": safety_backup} if safety_backup else {})}))


def _row(cols: list[str] | tuple[str, ...], prefix: str) -> sql.Composable:
    return (sql.SQL("({})").format(sql.SQL(", ").join(sql.Identifier(prefix, c) for c in cols)) if len(cols) > 1
            else sql.Identifier(prefix, cols[0]))


@dataclass
class Pack:
    """A pack read back from the store (spooled to a temporary file: a zip is read from its end)."""

    info: BackupInfo
    manifest: dict[str, Any]
    zf: zipfile.ZipFile
    _file: IO[bytes]

    def open(self, path: str) -> IO[bytes]:
        return self.zf.open(path)

    def read_text(self, path: str) -> str:
        return self.zf.read(path).decode()

    def close(self) -> None:
        self.zf.close()
        self._file.close()

    def table(self, name: str) -> dict[str, Any]:
        for e in self.manifest["tables"]:
            if e["table"] == name or e["name"] == name:
                return e
        raise BackupNotFound(f"the reconciliation pack {self.info.name} holds no table {name!r}; it holds "
                             + ", ".join(e["table"] for e in self.manifest["tables"]), backup=self.info.name)


def read_zip(store: BackupStore, name: str, what: str, member: str) -> tuple[BackupInfo, zipfile.ZipFile, IO[bytes], Any]:
    """Spool a zip from the store (checksum verified) to a temporary file (a zip is read from its end) and open
    it; returns (info, zip, file, the JSON of `member`)."""
    f = tempfile.TemporaryFile(prefix="dr-zip-")
    try:
        with store.reader(name) as r:
            while chunk := r.read(1 << 20):
                f.write(chunk)
            r.verify()
            info = r.info
        f.seek(0)
        zf = zipfile.ZipFile(f)
        meta = json.loads(zf.read(member))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        f.close()
        raise BackupError(f"the {what} {name} is unreadable: {exc}", backup=name) from exc
    except BaseException:
        f.close()
        raise
    return info, zf, f, meta


def read_pack(store: BackupStore, name: str) -> Pack:
    """Read a pack (checksum verified) into a temporary file and open it."""
    info, zf, f, manifest = read_zip(store, name, "reconciliation pack", "manifest.json")
    return Pack(info, manifest, zf, f)


# --- the statements that re-apply discarded writes ------------------------------------------------


def _qualified(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)


def _references_exist(entry: dict[str, Any], alias: str) -> sql.Composable:
    """Every foreign key of the row in `alias` is satisfied now (MATCH SIMPLE: a NULL column needs nothing)."""
    parts = []
    for fk in entry["foreign_keys"]:
        nulls = sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(sql.Identifier(alias, c)) for c in fk["columns"])
        parts.append(sql.SQL("({} OR EXISTS (SELECT 1 FROM {} p WHERE {} = {}))").format(
            nulls, _qualified(fk["parent_schema"], fk["parent_name"]), _row(fk["parent_columns"], "p"),
            _row(fk["columns"], alias)))
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")


def temp_names(i: int) -> dict[str, sql.Identifier]:
    return {INSERTED: sql.Identifier(f"dr_ins_{i}"), UPDATED: sql.Identifier(f"dr_upd_{i}"),
            "updated_t_md5": sql.Identifier(f"dr_md5_{i}")}


def create_temps(entry: dict[str, Any], i: int) -> list[tuple[str, sql.Composable]]:
    """(file key, CREATE TEMP TABLE) for each file of a table's pack that the statements read."""
    t = _qualified(entry["schema"], entry["name"])
    names = temp_names(i)
    out = []
    for key in (INSERTED, UPDATED):
        if key in entry["files"]:
            out.append((key, sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(names[key], t)))
    if "updated_t_md5" in entry["files"]:
        out.append(("updated_t_md5", sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {}, NULL::bigint AS {} "
                                             "FROM {} WITH NO DATA").format(
            names["updated_t_md5"], idents(entry["primary_key"]), sql.Identifier(T_MD5), t)))
    return out


def statements(entry: dict[str, Any], i: int) -> dict[str, sql.Composable]:
    """The INSERT and UPDATE that re-apply a table's discarded writes, reading the temporary tables of `create_temps`.

    An inserted row goes back when its key is free and its references exist (`ON CONFLICT DO NOTHING`
    skips one that another unique key refuses). An updated row goes back when the row is still exactly
    as at T (its md5 matches) and the references of its post-T value exist.
    """
    t = _qualified(entry["schema"], entry["name"])
    pk, names = entry["primary_key"], temp_names(i)
    writable = entry["writable"]
    out: dict[str, sql.Composable] = {}
    if INSERTED in entry["files"]:
        out[INSERTED] = sql.SQL(
            "INSERT INTO {t} ({c}) OVERRIDING SYSTEM VALUE SELECT {sc} FROM {s} s "
            "WHERE NOT EXISTS (SELECT 1 FROM {t} x WHERE {xk} = {sk}) AND {refs} ON CONFLICT DO NOTHING").format(
            t=t, c=idents(writable), sc=idents(writable, "s"), s=names[INSERTED], xk=_row(pk, "x"), sk=_row(pk, "s"),
            refs=_references_exist(entry, "s"))
    setcols = [c for c in writable if c not in pk and c not in entry["identity_always"]]
    if UPDATED in entry["files"] and setcols:
        out[UPDATED] = sql.SQL(
            "UPDATE {t} x SET {sets} FROM {s} s JOIN {m} m USING ({pk}) "
            "WHERE {xk} = {sk} AND {hash} = m.{md5} AND {refs}").format(hash=row_hash(entry.get("row_hash", TEXT)),
            t=t, s=names[UPDATED], m=names["updated_t_md5"], pk=idents(pk), xk=_row(pk, "x"), sk=_row(pk, "s"),
            md5=sql.Identifier(T_MD5), refs=_references_exist(entry, "s"),
            sets=sql.SQL(", ").join(sql.SQL("{} = s.{}").format(sql.Identifier(c), sql.Identifier(c)) for c in setcols))
    return out


_VERBS = {"O": "ENABLE", "A": "ENABLE ALWAYS"}


def render_script(manifest: dict[str, Any]) -> str:
    """`apply.sql`: psql script re-applying every table's non-conflicting discarded writes in one transaction."""
    def s(c: sql.Composable) -> str:
        return c.as_string(None)

    lines = [f"-- Re-apply the writes made after T that table-level recovery of incident {manifest['incident']} "
             "discarded,", "-- where they do not conflict. Run from the unzipped pack's folder:",
             "--   psql \"<connection>\" -v ON_ERROR_STOP=1 -f apply.sql", "\\set ON_ERROR_STOP on", "BEGIN;",
             "-- rows are compared by the md5 of their text, which these settings fix", SESSION_SETTINGS + ";"]
    entries = [e for e in manifest["tables"] if not e["whole_table"]]
    triggers = [tr for e in entries for tr in e["triggers"]]
    if triggers:
        lines.append("-- the tables' user triggers must not fire on re-applied rows (needs ownership of the tables)")
        lines += [s(sql.SQL("ALTER TABLE {} DISABLE TRIGGER {};").format(
            _qualified(tr["schema"], tr["name_of_relation"]), sql.Identifier(tr["name"]))) for tr in triggers]
    for i, e in enumerate(entries):
        if not e["files"].keys() & {INSERTED, UPDATED}:
            continue
        lines += ["", f"-- {e['table']}: {e['counts'][INSERTED]} inserted and {e['counts'][UPDATED]} updated after T"]
        for key, create in create_temps(e, i):
            lines.append(s(create) + ";")
            lines.append(f"\\copy {temp_names(i)[key].as_string(None)} FROM '{e['files'][key]}' "
                         "WITH (FORMAT csv, HEADER true)")
        for stmt in statements(e, i).values():
            lines.append(s(stmt) + ";")
    for e in manifest["tables"]:
        if e["whole_table"]:
            lines += ["", f"-- {e['table']} has no primary key: its rows cannot be matched, so nothing is re-applied "
                          f"(every row it held before the recovery is in {e['files'].get('all_rows')})"]
    if triggers:
        lines.append("")
        lines += [s(sql.SQL("ALTER TABLE {} " + _VERBS[tr["enabled"]] + " TRIGGER {};").format(
            _qualified(tr["schema"], tr["name_of_relation"]), sql.Identifier(tr["name"]))) for tr in triggers]
    lines += ["SET CONSTRAINTS ALL IMMEDIATE;", "COMMIT;", ""]
    return "\n".join(lines)


# --- records of apply attempts ----------------------------------------------------------------------------


def write_record(store: BackupStore, name: str, payload: dict[str, Any], *, incident: str) -> BackupInfo:
    """Store one small JSON record durably (never overwritten; a new name per attempt)."""
    data = json.dumps(payload, indent=2, default=str).encode()
    now = datetime.now(timezone.utc)
    with store.writer(name) as writer:
        writer.write(data)
        return writer.commit(BackupInfo(
            name=name, size=0, complete=True, created_at=now, finished_at=now, kind=RECORD_KIND, format="json",
            source_server=payload.get("server"), database=payload.get("database"), manifest=payload,
            extra={"label": incident}))


def find_records(store: BackupStore, incident: str) -> list[BackupInfo]:
    """The incident's records of apply attempts, oldest first."""
    found = [b for b in store.list_backups() if b.kind == RECORD_KIND and b.complete and b.extra.get("label") == incident]
    return sorted(found, key=lambda b: b.created_at)


def find_packs(store: BackupStore, incident: str) -> list[BackupInfo]:
    """The incident's reconciliation packs, newest first."""
    return [b for b in store.list_backups() if b.kind == PACK_KIND and b.complete and b.extra.get("label") == incident]
