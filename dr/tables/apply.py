"""Replace the rows of the closure tables with the PTR server's, in ONE transaction on the live database.

Inside that transaction, in this order:

1. the replaced tables are locked against writers, as its first statements, before its snapshot is
   taken (so that it sees every write committed before it holds the locks): SHARE ROW EXCLUSIVE
   (readers go on), ACCESS EXCLUSIVE for a table approved for bulk replacement (TRUNCATE needs it);
2. its id (`txid_current()`) is recorded durably in the store (`record`), so that a re-run can
   ask the live server whether it committed (`txid_status`) and never apply twice;
3. it establishes that it acts on exactly the approved comparison: the comparison kept by the
   report (`dr.tables.carry`) when the live tables are proven unchanged since it was made (same
   files, same row count, no row written since its snapshot: one light scan per table); otherwise
   the key columns and a hash of each row at T are streamed again from the PTR server (COPY to COPY,
   no file) and compared with the live rows by primary key. Either way the result must be exactly
   what was approved (same keys, same live row hashes, same method per table) or nothing is done;
4. user triggers of the closure tables are disabled (ALTER TABLE ... DISABLE TRIGGER, which
   needs ownership: refused beforehand, naming the owner, otherwise), so that restored rows are
   the rows as at T and no trigger writes elsewhere; foreign keys stay enforced;
5. the rows are made equal to T. A table where most rows change, approved for bulk replacement, is
   stripped of its keys and indexes, emptied and reloaded from the PTR server (`dr.tables.bulk`).
   Every other table is changed row by row: removed rows deleted (children first), reverted rows
   updated (their rows at T fetched whole by key), rows that come back streamed from the PTR server
   straight into the live table by key (COPY to COPY; only changed rows travel), the rows needed
   from parent tables inserted. Each row step runs in a savepoint; a step that a key or unique
   constraint stops for now (because another step must go first) is tried again after the others,
   until all are done or none progresses (then the constraint is named and everything is rolled back);
6. the bulk tables' constraints and indexes are rebuilt as they were and their foreign keys
   re-added and validated (each key checked once over the whole table); triggers are put back
   exactly as they were; deferred constraints are checked (`SET CONSTRAINTS ALL IMMEDIATE`);
7. the result is verified: every replaced table equals its rows at T (row hashes by key; for a
   bulk table, its row count and the sum of its row hashes), every needed row is there, the
   rebuilt definitions equal the recorded ones, and no table outside the closure was written in
   this transaction (`pg_stat_xact_user_tables`);
8. sequences of the closure tables that are behind the PTR server's are set forward to it
   (never back: ids handed out after T are never handed out again). `setval` cannot be rolled
   back, so it is the last statement before COMMIT; it happens only when the PTR server is ahead,
   which needs a sequence reset after T.

Columns and tables: generated (STORED) columns are never written, the server computes them again
from the restored values (so they equal T's while the expression is unchanged); identity columns,
GENERATED ALWAYS included, get their values as at T (COPY, or `OVERRIDING SYSTEM VALUE`) and are
never updated; a partitioned table is read, updated and written through its root, and because its
primary key includes the partition key, a row whose partition key changed after T is a different
key: its post-T version is removed and its version at T comes back into its own partition.
Triggers: user triggers (and constraint triggers) of the closure tables do not fire on restored
rows (step 4), nor on the TRUNCATE of a bulk table; the foreign keys' own triggers do, so every key
is checked (for a bulk table, by the validation of the re-added key).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

import psycopg
from psycopg import sql

from dr.commands import ConnInfo
from dr.database import connect
from dr.errors import RestoreError
from dr.tables import bulk
from dr.tables.bulk import BULK
from dr.tables.carry import Carried, load_carried, prove_unchanged
from dr.tables.catalog import Catalog, TableInfo, Trigger, read_catalog
from dr.tables.closure import parse_choice, work_out_closure
from dr.tables.compare import (
    H,
    REVERTED,
    Stage,
    TableRecoveryRefused,
    Work,
    _sequence_value,
    _sequences,
    _stage_table,
    copy_between,
    idents,
    open_sessions,
    raise_blockers,
    rel,
    row_of,
    stage_and_compare,
    start_work,
)

log = logging.getLogger("dr.tables")

#: how long the recovery waits for a lock held by another session before it gives up (nothing changed)
LOCK_TIMEOUT = "30s"
#: rounds of the apply loop; a round either finishes a step or proves none can progress
MAX_ROUNDS = 8


@dataclass
class ApplyResult:
    txid: int
    applied: dict[str, dict[str, int]] = field(default_factory=dict)  # table -> deleted/updated/inserted
    sequences_moved: list[str] = field(default_factory=list)
    triggers: list[str] = field(default_factory=list)
    rounds: int = 0
    seconds: float = 0.0
    verified: str = ""
    verified_by: dict[str, str] = field(default_factory=dict)
    failed_steps: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    compared: str = ""  # how the approved comparison was established in the transaction
    validated: list[str] = field(default_factory=list)  # foreign keys re-added and validated (bulk)

    def summary(self) -> str:
        parts = []
        for t, c in self.applied.items():
            done = ", ".join(f"{k} {v}" for k, v in c.items() if v)
            parts.append(f"{t}: {done or 'nothing to do'}")
        return "; ".join(parts)


Step = tuple[str, str, Callable[[], int]]


def _fetch_reverted(w: Work) -> dict[str, Stage]:
    """The rows at T of every reverted row, fetched whole from the PTR server by key (only those travel)."""
    out: dict[str, Stage] = {}
    for t in w.closure.replaced:
        info = w.info(t)
        if not info.primary_key or not w.changes[t].counts[REVERTED] or w.changes[t].method == BULK:
            continue
        q = _ship_keys(w, t, sql.SQL("SELECT {pk} FROM {d} WHERE _dr_kind = 'reverted'").format(
            pk=idents(info.primary_key), d=w.diffs[t]))
        where = sql.SQL("{} IN (SELECT {} FROM {})").format(row_of(info.primary_key, "x"), idents(info.primary_key), q)
        out[t] = _stage_table(w, t, tuple(c.name for c in info.columns), where)
    return out


def _ship_keys(w: Work, table: str, keys: sql.Composable, into: sql.Identifier | None = None) -> sql.Identifier:
    """Copy the keys a query on the live session returns into a temporary table of the PTR session."""
    info = w.info(table)
    if into is None:
        into = w.temp("q")
        w.ptr.execute(sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
            into, idents(info.primary_key), info.ident))
    else:
        w.ptr.execute(sql.SQL("TRUNCATE {}").format(into))
    copy_between(w.live, keys, w.ptr, into, info.primary_key)
    w.ptr.execute(sql.SQL("ANALYZE {}").format(into))
    return into


def _steps(w: Work, reverted: dict[str, Stage]) -> list[Step]:
    """(table, what, run): deletes children first, then updates, then inserts parents first.

    Tables replaced in bulk have no steps here (`_replace_in_bulk` ran before)."""
    out: list[Step] = []
    replaced = [t for t in w.closure.replaced if w.changes[t].method != BULK]

    def execute(*statements: sql.Composable) -> Callable[[], int]:
        def run() -> int:
            n = 0
            for stmt in statements:
                n = w.live.execute(stmt).rowcount
            return max(n, 0)
        return run

    for t in reversed(replaced):
        info = w.info(t)
        if info.primary_key:  # the keys the comparison found only in the live table
            out.append((t, "deleted", execute(sql.SQL(
                "DELETE FROM {t} x WHERE {xk} IN (SELECT {pk} FROM {d} WHERE _dr_kind = 'removed')").format(
                t=rel(info), d=w.diffs[t], pk=idents(info.primary_key), xk=row_of(info.primary_key, "x")))))
    for t, rows in reverted.items():
        info = w.info(t)
        setcols = [c for c in info.writable if c not in info.primary_key and c not in info.identity_always]
        if setcols:
            out.append((t, "updated", execute(sql.SQL(
                "UPDATE {t} x SET {sets} FROM {s} s WHERE {xk} = {sk} AND {hash} IS DISTINCT FROM s.{h}").format(
                t=rel(info), s=rows.name, h=sql.Identifier(H), xk=row_of(info.primary_key, "x"), hash=w.hash(t),
                sk=row_of(info.primary_key, "s"),
                sets=sql.SQL(", ").join(sql.SQL("{} = s.{}").format(sql.Identifier(c), sql.Identifier(c))
                                        for c in setcols)))))
    for t in w.closure.order:
        info = w.info(t)
        cols = idents(info.writable)
        if t in w.closure.replaced and w.changes[t].method == BULK:
            continue
        if t in replaced and not info.primary_key:
            # no key to match rows by: the whole table out and the rows at T in, as one step
            out.append((t, "replaced", execute(
                sql.SQL("DELETE FROM {}").format(rel(info)),
                sql.SQL("INSERT INTO {i} ({c}) OVERRIDING SYSTEM VALUE SELECT {c} FROM {s}").format(
                    i=info.ident, c=cols, s=w.stages[t].name))))
        elif t in replaced:
            out.append((t, "inserted", _copy_missing(w, t)))
        elif t in w.needed and w.needed[t].rows:
            match = (sql.SQL("{} = {}").format(row_of(info.primary_key, "x"), row_of(info.primary_key, "s"))
                     if info.primary_key else sql.SQL("{} = s.{}").format(w.hash(t), sql.Identifier(H)))
            out.append((t, "inserted", execute(sql.SQL(
                "INSERT INTO {i} ({c}) OVERRIDING SYSTEM VALUE SELECT {sc} FROM {s} s "
                "WHERE NOT EXISTS (SELECT 1 FROM {t} x WHERE {m})").format(
                i=info.ident, c=cols, sc=idents(info.writable, "s"), s=w.needed[t].name, t=rel(info), m=match))))
    return out


def _copy_missing(w: Work, t: str) -> Callable[[], int]:
    """The step that brings back the rows at T whose keys the live table lacks: their keys go to the PTR
    server, and the rows stream from it straight into the live table (COPY to COPY, no temporary copy)."""
    info = w.info(t)
    box: dict[str, sql.Identifier] = {}

    def run() -> int:
        missing = sql.SQL("SELECT {dpk} FROM {d} d WHERE d._dr_kind = 'back' AND NOT EXISTS "
                          "(SELECT 1 FROM {t} x WHERE {xk} = {dk})").format(
            dpk=idents(info.primary_key, "d"), d=w.diffs[t], t=rel(info), xk=row_of(info.primary_key, "x"),
            dk=row_of(info.primary_key, "d"))
        box["q"] = _ship_keys(w, t, missing, box.get("q"))
        n = w.ptr.execute(sql.SQL("SELECT count(*) FROM {}").format(box["q"])).fetchone()[0]
        if n:
            query = sql.SQL("SELECT {c} FROM {t} x WHERE {xk} IN (SELECT {pk} FROM {q})").format(
                c=idents(info.writable, "x"), t=rel(info), xk=row_of(info.primary_key, "x"),
                pk=idents(info.primary_key), q=box["q"])
            copy_between(w.ptr, query, w.live, info.ident, info.writable)
        return n
    return run


def _replace_in_bulk(w: Work, result: ApplyResult) -> bulk.Plan | None:
    """Strip the bulk tables of their keys and indexes, empty them and load their rows at T (dr.tables.bulk)."""
    tables = [t for t in w.closure.replaced if w.changes[t].method == BULK]
    if not tables:
        return None
    plan = bulk.plan_bulk(w.live, w.cat, tables)
    why = {t: b for t, b in plan.blockers.items() if b}
    if why:  # approved in bulk, but no longer possible: nothing is done
        raise TableRecoveryRefused(
            "the approved bulk replacement is no longer possible: " + "; ".join(f"{t}: {', '.join(b)}"
                                                                          for t, b in why.items())
            + ": nothing was done; run the same command again to compare and approve afresh",
            world_state="the live database is exactly as it was (the transaction was rolled back)")
    bulk.drop(w.live, plan)
    for t in tables:
        info = w.info(t)
        w.live.execute(sql.SQL("TRUNCATE ONLY {}").format(info.ident))
        n = copy_between(w.ptr, sql.SQL("SELECT {} FROM ONLY {} x").format(idents(info.writable, "x"), info.ident),
                         w.live, info.ident, info.writable, freeze=True)
        result.applied.setdefault(t, {}).update({"emptied": w.changes[t].live_rows, "reloaded in bulk": n})
    return plan


def _run_statements(w: Work, result: ApplyResult, reverted: dict[str, Stage]) -> None:
    """Run every step, retrying those a constraint stops until the others have run (see the module doc)."""
    pending = _steps(w, reverted)
    for t in w.closure.order:
        result.applied.setdefault(t, {})
    last_error: dict[int, psycopg.Error] = {}
    rounds = 0
    while pending:
        rounds += 1
        failed = []
        for step in pending:
            table, what, run = step
            try:
                with w.live.transaction():  # a savepoint: a refused step leaves nothing behind
                    n = run()
            except psycopg.errors.IntegrityError as exc:
                failed.append(step)
                last_error[id(step)] = exc
                result.failed_steps += 1
                continue
            result.applied[table][what] = result.applied[table].get(what, 0) + n
        if len(failed) == len(pending) or rounds >= MAX_ROUNDS:
            table, what, _ = failed[0]
            exc = last_error[id(failed[0])]
            diag = exc.diag
            raise TableRecoveryRefused(
                f"the rows of {table} could not be {what}: constraint {diag.constraint_name or '?'}"
                f"{' on ' + diag.table_name if diag.table_name else ''} refuses them ({diag.message_primary}"
                f"{'; ' + diag.message_detail if diag.message_detail else ''}); the rows at T conflict with rows "
                "the live database holds outside what is replaced. Everything was rolled back",
                world_state="the live database is exactly as it was (the transaction was rolled back)")
        pending = failed
    result.rounds = rounds


def set_triggers(c: psycopg.Connection, cat: Catalog, triggers: list[Trigger], enable: bool) -> None:
    """Disable the firing user triggers (`enable=False`), or put every one back to its recorded state."""
    by_rel = {t.name: t for t in cat.tables.values()}
    ordered = [t for t in triggers if not t.cloned] + [t for t in triggers if t.cloned]  # a root's change reaches its clones
    if not enable:
        for tr in ordered:
            if tr.fires and _trigger_state(c, by_rel[tr.relation], tr.name) in ("O", "A"):
                c.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(
                    by_rel[tr.relation].ident, sql.Identifier(tr.name)))
        return
    verbs = {"O": "ENABLE", "A": "ENABLE ALWAYS", "R": "ENABLE REPLICA", "D": "DISABLE"}
    for tr in ordered:
        if _trigger_state(c, by_rel[tr.relation], tr.name) != tr.enabled:
            c.execute(sql.SQL("ALTER TABLE {} " + verbs[tr.enabled] + " TRIGGER {}").format(
                by_rel[tr.relation].ident, sql.Identifier(tr.name)))
    for tr in triggers:
        if _trigger_state(c, by_rel[tr.relation], tr.name) != tr.enabled:
            raise RestoreError(f"trigger {tr.name} on {tr.relation} could not be put back to state {tr.enabled}")


def _trigger_state(c: psycopg.Connection, info: TableInfo, name: str) -> str:
    return c.execute("SELECT tgenabled::text FROM pg_trigger WHERE tgrelid = %s AND tgname = %s",
                     (info.oid, name)).fetchone()[0]


def _verify(w: Work, result: ApplyResult, proven: bool) -> list[str]:
    """What still differs from the rows at T (empty when the replacement is exact).

    Every key that differed is checked row by row (hash by key). The rows that did not differ are
    proven untouched when every step succeeded at its first try and this transaction's own counts
    of rows inserted, updated and deleted in each table (`pg_stat_xact_user_tables`) are exactly
    the steps' (nothing else, no cascade, wrote there); otherwise the whole table is compared again.
    """
    problems: list[str] = []
    written = _written(w)
    for t in w.closure.replaced:
        info = w.info(t)
        if w.changes[t].method == BULK:  # every row: the same number, and the same sum of row hashes, as at T
            n, total = w.live.execute(sql.SQL("SELECT count(*), coalesce(sum({}::numeric), 0)::text FROM {} x").format(
                w.hash(t), rel(info))).fetchone()
            if (n, total) != w.t_sums[t]:
                problems.append(f"{t}: {n} rows (sum of row hashes {total}) where T has {w.t_sums[t][0]} "
                                f"(sum {w.t_sums[t][1]})")
            result.verified_by[t] = "every row: count and sum of row hashes"
            continue
        ours = result.applied.get(t, {})
        counted = written.get(t, (0, 0, 0))
        exact = proven and info.primary_key and counted == (
            ours.get("inserted", 0), ours.get("updated", 0), ours.get("deleted", 0))
        if exact:
            d = w.diffs[t]
            n = w.live.execute(sql.SQL(
                "SELECT count(*) FROM {d} d LEFT JOIN {t} x ON {xk} = {dk} WHERE CASE WHEN d._dr_kind = 'removed' "
                "THEN x IS NOT NULL ELSE x IS NULL OR {hash} IS DISTINCT FROM d._dr_t_h END").format(
                d=d, t=rel(info), xk=row_of(info.primary_key, "x"), dk=row_of(info.primary_key, "d"),
                hash=w.hash(t))).fetchone()[0]
        elif info.primary_key:
            if t in w.partial:  # the kept comparison staged only the keys that change: every row at T now
                w.stages[t] = _stage_table(w, t, w.stages[t].columns)
                w.partial.discard(t)
            stage = w.stages[t]
            n = w.live.execute(sql.SQL(
                "SELECT count(*) FROM (SELECT {xpk}, {hash} AS h FROM {t} x) l "
                "FULL JOIN (SELECT {pk}, {h} AS h FROM {s}) s USING ({pk}) WHERE l.h IS DISTINCT FROM s.h").format(
                xpk=idents(info.primary_key, "x"), pk=idents(info.primary_key), t=rel(info), h=sql.Identifier(H),
                s=stage.name, hash=w.hash(t))).fetchone()[0]
        else:
            stage = w.stages[t]
            n = w.live.execute(sql.SQL(
                "SELECT (SELECT count(*) FROM (SELECT {hash} FROM {t} x EXCEPT ALL SELECT {h} FROM {s}) a)"
                " + (SELECT count(*) FROM (SELECT {h} FROM {s} EXCEPT ALL SELECT {hash} FROM {t} x) b)"
            ).format(t=rel(info), h=sql.Identifier(H), s=stage.name, hash=w.hash(t))).fetchone()[0]
        if n:
            problems.append(f"{t}: {n} rows differ from T")
        result.verified_by[t] = "changed keys + transaction counts" if exact else "every row"
    for t, stage in w.needed.items():
        info = w.info(t)
        match = (sql.SQL("{} = {} AND {} = s.{}").format(
            row_of(info.primary_key, "x"), row_of(info.primary_key, "s"), w.hash(t), sql.Identifier(H))
            if info.primary_key else sql.SQL("{} = s.{}").format(w.hash(t), sql.Identifier(H)))
        n = w.live.execute(sql.SQL("SELECT count(*) FROM {s} s WHERE NOT EXISTS (SELECT 1 FROM {t} x WHERE {m})").format(
            s=stage.name, t=rel(info), m=match)).fetchone()[0]
        if n:
            problems.append(f"{t}: {n} needed rows are missing")
    return problems


def _written(w: Work) -> dict[str, tuple[int, int, int]]:
    """Rows this transaction inserted, updated and deleted per closure table (partitions summed into their root)."""
    root = {}
    for t in w.closure.order:
        root[t] = t
        for p in w.info(t).partitions:
            root[p] = t
    out: dict[str, tuple[int, int, int]] = {}
    for schema, table, ins, upd, dele in w.live.execute(
            "SELECT schemaname, relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_xact_user_tables "
            "WHERE schemaname NOT LIKE 'pg_temp%%'").fetchall():
        t = root.get(f"{schema}.{table}")
        if t:
            a, b, c = out.get(t, (0, 0, 0))
            out[t] = (a + ins, b + upd, c + dele)
    return out


def _written_outside(w: Work) -> list[str]:
    """Tables outside the closure that this transaction wrote (must be none)."""
    inside = set(w.closure.order)
    for t in list(inside):
        inside.update(w.info(t).partitions)
    out = []
    for schema, table, ins, upd, dele in w.live.execute(
            "SELECT schemaname, relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_xact_user_tables "
            "WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 AND schemaname NOT LIKE 'pg_temp%%'").fetchall():
        if f"{schema}.{table}" not in inside:
            out.append(f"{schema}.{table} (+{ins} ~{upd} -{dele})")
    return out


def _move_sequences(w: Work, result: ApplyResult) -> None:
    for move in _sequences(w, w.closure.order):
        if not move.moves:
            continue
        seq = next(s for t in w.closure.order for s in w.info(t).sequences if s.display == move.sequence)
        last, called, inc = _sequence_value(w.live, seq.ident, seq.schema, seq.name)  # again, just before
        now = last + inc if called else last
        if (move.ptr_next - now) * (1 if inc > 0 else -1) > 0:
            w.live.execute("SELECT setval(%s::regclass, %s, %s)", (f"{seq.ident.as_string(w.live)}",
                                                                     move.ptr_last, move.ptr_called))
            result.sequences_moved.append(f"{move.sequence} {now} → {move.ptr_next}")


def txid_status(live: ConnInfo, txid: int) -> str | None:
    """`committed`, `aborted`, `in progress`, or None when the server no longer knows (or never knew) it."""
    with connect(live) as c:
        try:
            return c.execute("SELECT txid_status(%s)", (txid,)).fetchone()[0]
        except psycopg.errors.InvalidParameterValue:  # a txid from the future: another cluster
            return None


def database_oid(live: ConnInfo) -> int:
    with connect(live) as c:
        return int(c.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0])


def _lock(lc: psycopg.Connection, tables: list[str] | str, approved: dict[str, str]) -> list[tuple[str, int]]:
    """Lock the tables to replace, before the transaction's snapshot is taken (so that it sees every write
    committed before the locks); returns (table, OID) as locked.

    The closure is first worked out from the catalog in a transaction of its own. Tables approved for bulk
    replacement are locked ACCESS EXCLUSIVE (TRUNCATE needs it), the others SHARE ROW EXCLUSIVE (readers go on).
    """
    chosen, excluded = parse_choice(tables)
    cat = read_catalog(lc)
    replaced = work_out_closure(cat, chosen, excluded).replaced
    lc.rollback()
    lc.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))  # the first statements:
    for mode, names in (("ACCESS EXCLUSIVE", [t for t in replaced if approved.get(t, "").startswith(BULK + "|")]),
                        ("SHARE ROW EXCLUSIVE", [t for t in replaced if not approved.get(t, "").startswith(BULK + "|")])):
        if names:  # LOCK TABLE takes no snapshot
            lc.execute(sql.SQL("LOCK TABLE {} IN " + mode + " MODE").format(
                sql.SQL(", ").join(cat.tables[t].ident for t in names)))
    lc.execute("SET LOCAL lock_timeout = 0")
    return [(t, cat.tables[t].oid) for t in replaced]


def apply_tables(live: ConnInfo, ptr: ConnInfo, tables: list[str] | str, *, approved: dict[str, str],
                 record: Callable[[int, int], None], application_name: str = "dr-orchestrator table recovery",
                 carried: Carried | None = None) -> ApplyResult:
    """Replace the closure tables' rows with the PTR server's, in one transaction (see the module doc).

    Args:
        live: the live database.
        ptr: the same database on the PTR server.
        tables: the chosen tables, as given to `compare` (`-name` narrows).
        approved: the digests of the approved report (`ChangeReport.digests()`): the transaction
            does nothing unless the comparison it acts on gives exactly these.
        record: called with (txid, database oid) before anything changes; it must store them durably.
        application_name: how the session shows in pg_stat_activity.
        carried: the approved comparison as kept by `dr.tables.carry.carry_out`; used when the live
            tables are proven unchanged since (otherwise, or when None, every row is compared again).

    Raises:
        TableRecoveryRefused: a blocker, a changed comparison, or a constraint that refuses the rows;
            nothing was changed.
        RestoreError: the verification failed or the session was lost; nothing was changed (or, if
            the commit itself was lost, the error says so and a re-run finds out).
    """
    started = time.monotonic()
    untouched = "the live database is exactly as it was (the transaction was rolled back)"
    with ExitStack() as stack:
        try:
            lc, pc = open_sessions(stack, live, ptr, application_name=application_name)
            # 2. no writer may change the replaced tables under us (readers go on, except on bulk tables)
            locked = _lock(lc, tables, approved)
            # 1. the transaction's id, recorded before anything changes
            txid = int(lc.execute("SELECT txid_current()").fetchone()[0])
            w = start_work(lc, pc, tables, full_rows=False)
            if [(t, w.info(t).oid) for t in w.closure.replaced] != locked:
                raise TableRecoveryRefused("the tables to replace changed while the recovery waited for its locks: "
                                           "nothing was done; run the same command again", world_state=untouched)
            raise_blockers(w.blockers, world_state=untouched)
            record(txid, w.cat.database_oid)
            result = ApplyResult(txid=txid)
            clock = [time.monotonic()]

            def lap(name: str) -> None:
                now_ = time.monotonic()
                result.timings[name] = round(now_ - clock[0], 3)
                clock[0] = now_

            # 3. exactly the approved comparison: the kept one if the live tables provably did not change
            #    since it was made, else made again (every row)
            why = ["no comparison was kept"] if carried is None else (
                ["the kept comparison is not the approved one"] if carried.digests != approved
                else prove_unchanged(w, carried, txid))
            lap("prove unchanged")
            if not why:
                load_carried(w, carried)
                result.compared = "kept comparison (live tables proven unchanged since)"
                lap("load kept comparison")
            else:
                result.compared = "compared again under the lock (" + "; ".join(why) + ")"
                stage_and_compare(w, lap)
                raise_blockers(w.blockers, world_state=untouched)
            now = {t: ch.digest for t, ch in w.changes.items()}
            if now != approved:
                differ = sorted(t for t in set(now) | set(approved) if now.get(t) != approved.get(t))
                raise TableRecoveryRefused(
                    f"the live data of {', '.join(differ)} changed since the report was approved (or the closure did): "
                    "nothing was done; run the same command again to compare and approve afresh",
                    world_state=untouched)
            # 4. triggers off
            triggers = [tr for t in w.closure.order for tr in w.info(t).triggers]
            result.triggers = [f"{tr.relation}.{tr.name}" for tr in triggers if tr.fires]
            set_triggers(w.live, w.cat, triggers, enable=False)
            # 5. rows: whole tables in bulk first (their keys dropped), then the others row by row
            w.live.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
            plan = _replace_in_bulk(w, result)
            lap("bulk load")
            reverted = _fetch_reverted(w)
            lap("fetch reverted rows")
            _run_statements(w, result, reverted)
            lap("statements")
            if plan is not None:  # indexes built once, keys re-added and validated once
                result.validated = bulk.rebuild(w.live, plan)
                lap("rebuild indexes and keys")
            w.live.execute("SET LOCAL lock_timeout = 0")
            # 6. triggers back, deferred constraints checked
            set_triggers(w.live, w.cat, triggers, enable=True)
            w.live.execute("SET CONSTRAINTS ALL IMMEDIATE")
            # 7. verify
            problems = _verify(w, result, proven=result.failed_steps == 0)
            if plan is not None:
                problems += [f"indexes and keys not rebuilt as they were: {d}"
                             for d in bulk.rebuilt_as_recorded(w.live, w.cat, plan)]
            lap("verify")
            outside = _written_outside(w)
            if outside:
                problems.append("tables outside the closure were written: " + ", ".join(outside))
            if problems:
                raise RestoreError("table-level recovery did not verify: " + "; ".join(problems),
                                   world_state=untouched)
            result.verified = (f"{len(w.closure.replaced)} replaced tables equal their rows at T "
                               f"({', '.join(f'{t}: {how}' for t, how in result.verified_by.items())}); "
                               f"{sum(s.rows for s in w.needed.values())} needed rows present; no table outside the "
                               "closure written" + ("; indexes and keys rebuilt exactly as they were, foreign keys "
                                                    f"validated: {', '.join(result.validated)}" if plan else ""))
            # 8. sequences forward (never back), last
            _move_sequences(w, result)
            w.ptr.rollback()
        except psycopg.errors.IntegrityError as exc:
            raise TableRecoveryRefused(f"a constraint refused the recovered rows: {exc.diag.constraint_name}: "
                                       f"{str(exc).strip()}", world_state=untouched) from exc
        except psycopg.errors.LockNotAvailable as exc:
            raise RestoreError(f"another session holds a lock on a table to replace ({str(exc).strip()})",
                               world_state=untouched) from exc
        except psycopg.OperationalError as exc:
            raise RestoreError(f"the session was lost during table-level recovery ({str(exc).strip().splitlines()[0]}); "
                               "its transaction was not committed", world_state=untouched) from exc
        try:
            w.live.commit()
        except psycopg.Error as exc:
            raise RestoreError(
                f"the COMMIT of table-level recovery (transaction {result.txid}) did not answer "
                f"({str(exc).strip().splitlines()[0]}): it may or may not have committed",
                world_state=f"unknown until checked: transaction {result.txid} on the live server is committed or not; "
                            "a re-run with the same incident asks the server and never applies twice") from exc
    result.seconds = time.monotonic() - started
    log.info("table-level recovery committed in transaction %s: %s", result.txid, result.summary())
    return result


__all__ = ["ApplyResult", "apply_tables", "set_triggers", "txid_status", "database_oid", "Catalog", "read_catalog"]
