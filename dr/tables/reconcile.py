"""Put back discarded writes from a reconciliation pack: the plan, then (approved) the same in earnest.

The plan is not a guess: the pack's rows are loaded into temporary tables and the very statements
of `apply.sql` run in a transaction that is then rolled back, so the counts are what applying
would do. Each row is classed first:

- inserted after T: **applies** (key free, references exist), **already there** (the same row is
  in the table: applied before), **key taken** (another row holds the key now), **missing parent**
  (a row it references is gone); a row another unique key refuses is counted as a **unique conflict**;
- updated after T: **applies** (the row is still exactly as at T), **already there**, **changed
  since** (someone changed it after the recovery: left alone), **gone** (deleted since), **missing
  parent**.

Applying runs in one transaction with the tables locked against writers, the user triggers of the
tables disabled (like the recovery; ownership needed), deferred constraints checked before commit,
and commits only if the counts are exactly the approved plan's. Running it again finds every row
"already there": nothing is done twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from dr.commands import ConnInfo
from dr.database import connect
from dr.errors import RestoreError
from dr.tables.apply import LOCK_TIMEOUT, set_triggers
from dr.tables.catalog import read_catalog
from dr.tables.compare import SAMPLES, SESSION_SETTINGS, TEXT, TableRecoveryRefused, row_hash
from dr.tables.pack import INSERTED, T_MD5, UPDATED, Pack, _qualified, _references_exist, _row, create_temps, \
    statements, temp_names

INSERT_CLASSES = ("applies", "already there", "key taken", "missing parent")
UPDATE_CLASSES = ("applies", "already there", "changed since", "gone", "missing parent")


@dataclass
class ReconcileTable:
    table: str
    inserted: dict[str, int] = field(default_factory=dict)
    updated: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)
    note: str = ""

    def line(self) -> str:
        if self.note:
            return f"{self.table}: {self.note}"
        out = []
        for part, counts in ((INSERTED, self.inserted), (UPDATED, self.updated)):
            if counts.get("in pack"):
                done = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "in pack" and v)
                out.append(f"{counts['in pack']} {part} after T ({done})")
        text = f"{self.table}: " + ("; ".join(out) or "nothing in the pack")
        for k, v in self.samples.items():
            text += f"; {k}: {', '.join(v)}"
        return text


@dataclass
class ReconcileResult:
    incident: str
    pack: str
    tables: list[ReconcileTable]
    applied: bool = False
    refused: list[str] = field(default_factory=list)
    triggers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def digest(self) -> str:
        """What applying does, for the check that the applied transaction is the approved plan."""
        return json.dumps({t.table: [t.inserted, t.updated] for t in self.tables}, sort_keys=True)

    def rows_applied(self) -> int:
        return sum(t.inserted.get("re-applied", 0) + t.updated.get("re-applied", 0) for t in self.tables)

    def text(self) -> str:
        head = (f"reconciliation of incident {self.incident} from {self.pack}: "
                + ("APPLIED" if self.applied else "plan (nothing changed)"))
        lines = [head] + [f"- {t.line()}" for t in self.tables]
        if self.triggers:
            lines.append(f"triggers disabled for the transaction: {', '.join(self.triggers)}")
        lines += [f"REFUSED: {r}" for r in self.refused]
        return "\n".join(lines)


def _key_text(pk: list[str], alias: str) -> sql.Composable:
    inner = sql.SQL(" || ', ' || ").join(sql.SQL("{}::text").format(sql.Identifier(alias, c)) for c in pk)
    return inner if len(pk) == 1 else sql.SQL("'(' || {} || ')'").format(inner)


def _classify(c: psycopg.Connection, query: sql.Composable) -> tuple[dict[str, int], dict[str, list[str]]]:
    counts: dict[str, int] = {}
    samples: dict[str, list[str]] = {}
    for cls, n, keys in c.execute(sql.SQL(
            "SELECT cls, count(*), (array_agg(k ORDER BY o))[1:%s] FROM ({}) q GROUP BY cls").format(query),
            (SAMPLES,)).fetchall():
        counts[cls] = n
        samples[cls] = keys
    return counts, samples


def _load(c: psycopg.Connection, pack: Pack, path: str, into: sql.Identifier) -> None:
    with c.cursor() as cur, cur.copy(sql.SQL("COPY {} FROM STDIN WITH (FORMAT csv, HEADER true)").format(into)) as cp:
        with pack.open(path) as f:
            while chunk := f.read(1 << 20):
                cp.write(chunk)
    c.execute(sql.SQL("ANALYZE {}").format(into))


def reconcile_tables(live: ConnInfo, pack: Pack, tables: list[str] | None = None, *, apply: bool = False,
                     approved: str | None = None,
                     application_name: str = "dr-orchestrator reconcile") -> ReconcileResult:
    """The plan of re-applying a pack's discarded writes (and, with `apply`, doing it); see the module doc.

    Args:
        live: the live database.
        pack: the incident's reconciliation pack (`read_pack`).
        tables: the pack's tables to re-apply (default: all of them).
        apply: commit (otherwise everything is rolled back: the plan).
        approved: the plan's `digest()` that was approved; applying refuses anything else.

    Raises:
        TableRecoveryRefused: with `apply`, when something is refused or the counts are not the approved plan's.
    """
    started = time.monotonic()
    m = pack.manifest
    entries = [pack.table(t) for t in tables] if tables else list(m["tables"])
    order = [e["table"] for e in m["tables"]]
    entries.sort(key=lambda e: order.index(e["table"]))  # parents first, as recovered
    result = ReconcileResult(m["incident"], pack.info.name, [])
    untouched = "the live database is exactly as it was (the transaction was rolled back)"
    with connect(live, autocommit=True) as c:
        c.execute(SESSION_SETTINGS)
        c.execute(sql.SQL("SET application_name = {}").format(sql.Literal(application_name[:63])))
        c.autocommit = False
        c.execute("BEGIN")
        try:
            cat = read_catalog(c)
            usable = []
            for e in entries:
                rt = ReconcileTable(e["table"])
                result.tables.append(rt)
                info = cat.tables.get(e["table"])
                if e["whole_table"]:
                    rt.note = ("no primary key: rows cannot be matched, so nothing is re-applied (its rows before the "
                               f"recovery are in {e['files'].get('all_rows')})")
                elif info is None:
                    result.refused.append(f"{e['table']} no longer exists in {cat.database}")
                elif [col.name for col in info.columns] != e["columns"]:
                    result.refused.append(f"{e['table']}: its columns changed since the pack was made "
                                          f"({', '.join(e['columns'])} → {', '.join(col.name for col in info.columns)})")
                else:
                    lacking = [p for p in ("SELECT", "INSERT", "UPDATE") if p not in info.privileges]
                    if lacking:
                        result.refused.append(f"{cat.user} lacks {', '.join(lacking)} on {e['table']}")
                    if info.firing_triggers and not info.owned:
                        result.refused.append(
                            f"ownership of {e['table']} (owner {info.owner}; GRANT {info.owner} TO {cat.user}) is "
                            f"needed to keep its triggers {', '.join(t.name for t in info.firing_triggers)} from "
                            "firing on re-applied rows")
                    usable.append((e, rt, info))
            if not cat.can_temp:
                result.refused.append(f"TEMPORARY on database {cat.database} (the pack's rows are loaded into "
                                      "temporary tables)")
            if result.refused:
                c.rollback()
                if apply:
                    raise TableRecoveryRefused("reconciliation refused: " + " | ".join(result.refused),
                                               world_state=untouched)
                result.seconds = time.monotonic() - started
                return result
            if usable:
                c.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
                c.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(
                    sql.SQL(", ").join(info.ident for _, _, info in usable)))
                c.execute("SET LOCAL lock_timeout = 0")
            triggers = [tr for _, _, info in usable for tr in info.triggers]
            result.triggers = [f"{tr.relation}.{tr.name}" for tr in triggers if tr.fires]
            set_triggers(c, cat, triggers, enable=False)
            for i, (e, rt, info) in enumerate(usable):
                _reconcile_one(c, pack, e, i, rt)
            set_triggers(c, cat, triggers, enable=True)
            c.execute("SET CONSTRAINTS ALL IMMEDIATE")
            if apply and approved is not None and result.digest() != approved:
                raise TableRecoveryRefused("the reconciliation would now do something other than the approved plan "
                                           "(the live data changed): nothing was done; run it again to see the new plan",
                                           world_state=untouched)
            if apply:
                c.commit()
                result.applied = True
            else:
                c.rollback()
        except psycopg.errors.IntegrityError as exc:
            raise TableRecoveryRefused(f"a constraint refused re-applied rows: {exc.diag.constraint_name}: "
                                       f"{str(exc).strip()}", world_state=untouched) from exc
        except psycopg.OperationalError as exc:
            raise RestoreError(f"the session was lost during reconciliation ({str(exc).strip().splitlines()[0]})",
                               world_state=untouched) from exc
    result.seconds = time.monotonic() - started
    return result


def _reconcile_one(c: psycopg.Connection, pack: Pack, e: dict[str, Any], i: int, rt: ReconcileTable) -> None:
    """Load one table's part of the pack, class its rows, and run its statements."""
    t = _qualified(e["schema"], e["name"])
    pk, names = e["primary_key"], temp_names(i)
    for key, create in create_temps(e, i):
        c.execute(create)
        _load(c, pack, e["files"][key], names[key])
    stmts = statements(e, i)
    refs = _references_exist(e, "s")
    if INSERTED in e["files"]:
        counts, samples = _classify(c, sql.SQL(
            "SELECT CASE WHEN x.{k0} IS NULL AND {refs} THEN 'applies' WHEN x.{k0} IS NULL THEN 'missing parent' "
            "WHEN md5(x::text) = md5(s::text) THEN 'already there' ELSE 'key taken' END AS cls, {kt} AS k, {sk} AS o "
            "FROM {s} s LEFT JOIN {t} x ON {xk} = {sk}").format(
            k0=sql.Identifier(pk[0]), refs=refs, kt=_key_text(pk, "s"), s=names[INSERTED], t=t,
            xk=_row(pk, "x"), sk=_row(pk, "s")))
        done = c.execute(stmts[INSERTED]).rowcount
        rt.inserted = {"in pack": e["counts"][INSERTED], **{k: counts.get(k, 0) for k in INSERT_CLASSES},
                       "unique conflict": counts.get("applies", 0) - done, "re-applied": done}
        rt.samples.update({f"inserted {k}": v for k, v in samples.items() if k != "applies"})
    if UPDATED in e["files"] and UPDATED in stmts:
        counts, samples = _classify(c, sql.SQL(
            "SELECT CASE WHEN x.{k0} IS NULL THEN 'gone' WHEN md5(x::text) = md5(s::text) THEN 'already there' "
            "WHEN {hash} IS DISTINCT FROM m.{md5} THEN 'changed since' "
            "WHEN {refs} THEN 'applies' ELSE 'missing parent' END AS cls, {kt} AS k, {sk} AS o "
            "FROM {s} s JOIN {m} m USING ({pk}) LEFT JOIN {t} x ON {xk} = {sk}").format(
            k0=sql.Identifier(pk[0]), refs=refs, kt=_key_text(pk, "s"), s=names[UPDATED], m=names["updated_t_md5"],
            hash=row_hash(e.get("row_hash", TEXT)),
            md5=sql.Identifier(T_MD5), pk=sql.SQL(", ").join(sql.Identifier(k) for k in pk), t=t,
            xk=_row(pk, "x"), sk=_row(pk, "s")))
        done = c.execute(stmts[UPDATED]).rowcount
        rt.updated = {"in pack": e["counts"][UPDATED], **{k: counts.get(k, 0) for k in UPDATE_CLASSES},
                      "re-applied": done}
        rt.samples.update({f"updated {k}": v for k, v in samples.items() if k != "applies"})
